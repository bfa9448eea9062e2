"""What both onnxruntime backends share: opening an edgelm ONNX folder (manifest, context, execution provider),
its tokenizer, the numpy sampler and the facts they report.  :class:`edgelm.runtimes.onnx.OnnxBackend` decodes
builder graphs with onnxruntime-genai, :class:`edgelm.runtimes.onnx_session.OnnxSessionBackend` plain graphs with
its own session loop."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Sequence

from edgelm.constraints import Constraint, tokenizer_from_tokenizer_json
from edgelm.errors import BackendError, InvalidParameterError, ModelNotFoundError
from edgelm.formats import onnx_folder
from edgelm.params import GenerationParams

from .base import BackendBase, LoadOptions, Seq, resolve_n_ctx
from .onnx_providers import PROVIDER_DEVICE, available_providers, choose_provider
from .sampling import NumpySampler
from .tokenizer_json import JsonTokenizer

log = logging.getLogger("edgelm.onnx")


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class OnnxFolderBackend(BackendBase):
    name: ClassVar[str] = "onnxruntime"

    @classmethod
    def inspect(cls, path: Path) -> dict[str, Any]:
        return onnx_folder.inspect(Path(path))

    @staticmethod
    def open_folder(path: Path) -> tuple[Path, dict[str, Any]]:
        """The model folder ``path`` names (the folder or a file in it) and its checked manifest."""
        folder = onnx_folder.folder_of(Path(path))
        if not folder.is_dir():
            raise ModelNotFoundError(f"{path} is not an ONNX model folder.",
                                     fix="Pass the folder written by `edgelm convert SRC --to onnx -o DIR`.",
                                     path=str(path))
        return folder, onnx_folder.check_folder(folder)

    def _setup(self, folder: Path, manifest: dict[str, Any], options: LoadOptions) -> None:
        """Options, context length and execution provider (before the runtime loads anything)."""
        if options.kv_cache not in (None, "f32", "f16"):
            raise InvalidParameterError(
                f"kv_cache={options.kv_cache!r} is not available on the onnxruntime backend (its KV cache has the "
                "model's own element type).", fix="Drop kv_cache=..., or use a GGUF model on llama.cpp.",
                parameter="kv_cache", value=options.kv_cache)
        self.path, self.manifest, self.options = folder, manifest, options
        trained = int(manifest.get("context_length") or 2048)
        self.n_ctx = resolve_n_ctx(options.n_ctx, trained, limit=trained)
        self.available = available_providers()
        self.provider, self.fallback_reason = choose_provider(options.device, options.providers, self.available,
                                                              manifest.get("execution_provider", "cpu"))
        if self.fallback_reason:
            log.warning("onnxruntime: running on CPU because %s.", self.fallback_reason)

    def _load_tokenizer(self) -> None:
        m = self.manifest
        self.tok = JsonTokenizer(self.path, eos_token_ids=m.get("eos_token_ids") or [],
                                 bos_token_id=m.get("bos_token_id"), vocab_size=m.get("vocab_size"),
                                 template_file=m.get("chat_template"))
        self.bos_token, self.eos_token = self.tok.bos_token, self.tok.eos_token
        self.chat_template = self.tok.chat_template
        self.n_vocab = self.tok.n_vocab

    # --- tokens ---------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self.tok.encode(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.tok.text(token)

    def is_eog(self, token: int) -> bool:
        return token in self.tok.eog

    def constraint_tokenizer(self) -> Any:
        """The vocabulary for llguidance, from the folder's tokenizer.json (built once); every end-of-generation
        token counts as EOS."""
        if getattr(self, "_lltokenizer", None) is None:
            self._lltokenizer = tokenizer_from_tokenizer_json(
                self.tok.file.read_text(encoding="utf-8"), n_vocab=self.n_vocab, eos_tokens=sorted(self.tok.eog))
        return self._lltokenizer

    def sampler(self, params: GenerationParams, history: Sequence[int]) -> NumpySampler:
        # a GBNF grammar goes through llguidance here (llama.cpp has its own)
        constraint = Constraint.gbnf(params.grammar).checked("grammar") if params.grammar else params.constraint
        return NumpySampler(params, history, self.n_ctx, guide=self.guide(constraint))

    # --- facts ------------------------------------------------------------------------------------------------------

    def runtime_facts(self) -> dict[str, Any]:
        """What this backend adds to ``describe()["extra"]``."""
        return {}

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "format": "onnx",
            "architecture": m.get("model_type") or m.get("architecture"),
            "quantization": m.get("quantization"),
            "parameters": int(m.get("parameters") or 0),
            "trained_context_length": m.get("context_length"),
            "name": m.get("name"),
            "device": PROVIDER_DEVICE.get(self.provider, self.options.device),
            "extra": {
                "execution_provider": self.provider,
                "available_providers": self.available,
                "provider_fallback": self.fallback_reason,
                "built_for": m.get("execution_provider"),
                "quantization_options": m.get("quantization_options"),
                "hf_architecture": m.get("architecture"),
                "onnxruntime": package_version("onnxruntime"),
                **self.runtime_facts(),
            },
        }


class HostLogitsBackend(OnnxFolderBackend):
    """A backend running its own onnxruntime sessions (plain graphs, the NPU's static pair): the last evaluated
    token's logits are kept on the host in ``_last``, and sampling reads them."""

    _last: Any = None  # np.ndarray of the last evaluated token's logits, None when nothing was evaluated

    def sample(self, seq: Seq, sampler: NumpySampler) -> int:
        if self._last is None:
            raise BackendError("No logits to sample from: nothing was evaluated.", fix="Evaluate a prompt first.")
        token = sampler(self._last)
        sampler.accept(token)
        return token
