"""llama-cpp-python opens libllama/libggml* with ctypes from llama_cpp/lib at run time: collect them there (the
versioned names too, which the libraries link against each other by).  Its OpenAI server and the Hugging Face
tokenizer adapter, and the OpenAI client and requests its high-level Llama class imports inside functions are left
out: edgelm drives the low-level bindings only."""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("llama_cpp")
excludedimports = ["llama_cpp.server", "transformers", "torch", "uvicorn", "fastapi", "starlette", "sse_starlette",
                   "starlette_context", "pydantic_settings", "openai", "requests", "pydantic"]
