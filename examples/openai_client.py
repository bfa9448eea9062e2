"""Talk to a running `edgelm serve` with the official openai package, unchanged.

    edgelm serve &            # serves the embedded model as "smollm2-135m-instruct" on 127.0.0.1:8080
    python examples/openai_client.py [http://127.0.0.1:8080]
"""

import sys

import openai

base = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080") + "/v1"
client = openai.OpenAI(base_url=base, api_key="not-needed-on-loopback")
stream = client.chat.completions.create(
    model="smollm2-135m-instruct", stream=True, max_tokens=64, temperature=0,
    messages=[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is the capital of France?"}],
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
