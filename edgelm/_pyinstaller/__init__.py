"""PyInstaller hooks shipped with edgelm, so that ``pyinstaller app.py`` freezes an app that imports edgelm with no
flags: PyInstaller finds this folder through the ``pyinstaller40`` entry point ``hook-dirs`` (pyproject.toml).

- ``hook-edgelm.py``: edgelm's package data (device profiles, the chat page, eval text), the backends it imports by
  name, the embedded default model when it is installed, and no converter stack (torch, transformers, onnx).
- ``hook-llama_cpp.py``: llama.cpp's shared libraries (llama_cpp/lib), which llama-cpp-python opens with ctypes
  at run time, so PyInstaller's import analysis never sees them.
- ``hook-onnxruntime.py``, ``hook-onnxruntime_genai.py``: their shared libraries, without their converter and
  optimization tools (which import torch and transformers); ours replace pyinstaller-hooks-contrib's onnxruntime hook.
- ``hook-huggingface_hub.py``, ``hook-tqdm.py``: no frameworks or notebook front-ends through their optional
  helpers (tqdm's package imports its matplotlib and IPython front-ends for old names); ``hook-httpx*.py``,
  ``hook-httpcore*.py``, ``hook-anyio.py``: asyncio only, no command-line front-end (no trio, rich, pytest).

Each hook's ``excludedimports`` applies to imports made by that package only (PyInstaller has no global exclude
that a hook can set), hence one small hook per package through which the frameworks would come in.
"""

from __future__ import annotations

import os


def get_hook_dirs() -> list[str]:
    return [os.path.dirname(__file__)]
