"""onnxruntime's shared libraries (as pyinstaller-hooks-contrib's hook, which this one replaces), without its
model-optimization tools: onnxruntime.transformers, .quantization and .tools import torch, transformers and onnx,
which running a model never needs (edgelm's converters use them, outside a frozen app)."""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("onnxruntime")
excludedimports = ["onnxruntime.transformers", "onnxruntime.quantization", "onnxruntime.tools", "torch",
                   "transformers", "onnx", "tensorflow", "sympy", "scipy", "matplotlib", "IPython"]
