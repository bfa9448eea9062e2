"""Converters: Hugging Face checkpoints to GGUF or quantized ONNX."""
