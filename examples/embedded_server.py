"""A desktop-style program that embeds the edgelm server in-process and streams an answer from it.

The server runs on a thread of this process (loopback, a free port); the "UI" talks to it over HTTP with the
standard library only, as any embedded web view or plugin of a desktop app would.

Run: python examples/embedded_server.py "Why is the sky blue?"
"""

import json
import sys
import urllib.request

from edgelm.server import BackgroundServer, create_app


def stream_answer(base_url: str, question: str):
    body = json.dumps({"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 80, "temperature": 0.7,
                       "seed": 1, "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                               {"role": "user", "content": question}]}).encode()
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event["choices"]:
                yield choice["delta"].get("content") or ""


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Why is the sky blue?"
    with BackgroundServer(create_app(keep_alive=60)) as server:  # the embedded default model
        print(f"[embedded server on {server.url}]\n> {question}\n")
        for piece in stream_answer(server.url, question):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
