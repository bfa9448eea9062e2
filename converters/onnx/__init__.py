"""The ONNX target: Hugging Face checkpoint -> self-contained, quantized ONNX model folder.

The entry point is :func:`convert_to_onnx` (and :data:`TARGET`, what ``edgelm.convert(..., to="onnx")`` runs), both
in :mod:`.export`.  The modules, by job:

* :mod:`.export` — the conversion: check the source, choose the exporter, write a temporary folder, check that it
  decodes, put it in place; the ``Target`` the converter registry names.
* :mod:`.options` — :class:`OnnxOptions` (the option record) and the choice of the weight rounding (``algo``).
* :mod:`.builder` — onnxruntime-genai's model builder, run in a child process (the default exporter).
* :mod:`.gptq` — GPTQ int4 weights, written as a GPTQ checkpoint the builder imports; :mod:`.mixed` puts the
  matrices GPTQ kept at 8 bits into the builder's graph; :mod:`.graph` edits the builder's embedding lookup.
* :mod:`.optimum` — optimum-onnx (its own folder, a child process) for the architectures the builder lacks; its plain
  graph is prepared and quantized by :mod:`.quantize` and its attention rewritten by :mod:`.attention`.
"""

from __future__ import annotations

from .export import (ARCHITECTURES, CARRIED_FILES, TARGET, OnnxStaged, OnnxTarget, check_source, choose_exporter,
                     convert_to_onnx)
from .options import OnnxOptions

__all__ = ["ARCHITECTURES", "CARRIED_FILES", "TARGET", "OnnxOptions", "OnnxStaged", "OnnxTarget", "check_source",
           "choose_exporter", "convert_to_onnx"]
