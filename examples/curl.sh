#!/usr/bin/env bash
# Stream from a running `edgelm serve` with curl: OpenAI-style SSE, then Ollama-style NDJSON.
set -euo pipefail
URL=${1:-http://127.0.0.1:8080}
curl -sN "$URL/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "smollm2-135m-instruct", "stream": true, "max_tokens": 32,
  "messages": [{"role": "user", "content": "Say hello in French."}]}'
echo
curl -sN "$URL/api/generate" -d '{"model": "smollm2-135m-instruct", "prompt": "Say hello in Spanish.",
  "options": {"num_predict": 16}}'
