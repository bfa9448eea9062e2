"""onnxruntime-genai loads its shared libraries (and onnxruntime's) from its package folder: collect them there.
Its model builder (onnxruntime_genai.models) converts with torch and transformers: not needed to run a model."""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs("onnxruntime_genai")
excludedimports = ["onnxruntime_genai.models", "torch", "transformers", "onnx", "onnx_ir", "onnxscript"]
