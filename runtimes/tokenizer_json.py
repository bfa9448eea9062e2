"""Token text from a Hugging Face ``tokenizer.json``: each token id's raw bytes (byte-level BPE or SentencePiece
style), which tokens end a generation, and the chat template shipped beside it.

Used by the onnxruntime backend, which tokenizes with the Rust ``tokenizers`` package and needs llama.cpp's view of
tokens (bytes that may split a UTF-8 character) for :mod:`edgelm.model`'s incremental decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edgelm.errors import InvalidModelFileError
from edgelm.optional import require

# end-of-turn tokens llama.cpp also treats as end of generation
EOG_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<|return|>", "</s>", "<|eom_id|>")


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed (byte-level BPE token text -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token id -> the raw bytes it stands for, from tokenizer.json (byte-level BPE or SentencePiece style)."""

    def __init__(self, spec: dict[str, Any], tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        model = spec.get("model") or {}
        decoder = json.dumps(spec.get("decoder") or {})
        pre = json.dumps(spec.get("pre_tokenizer") or {})
        self.byte_level = '"ByteLevel"' in decoder or '"ByteLevel"' in pre
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.metaspace = "\u2581" in decoder or '"Metaspace"' in pre or '"Metaspace"' in decoder
        self.special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        self.added = {t["id"]: t["content"] for t in spec.get("added_tokens") or []}
        self.byte_decoder = gpt2_byte_decoder() if self.byte_level else {}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self.cache.get(token)
        if piece is None:
            piece = self.cache[token] = self._bytes(token)
        return piece

    def _bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        if token in self.added:
            return self.added[token].encode("utf-8")
        text = self.tokenizer.id_to_token(token)
        if text is None:
            return b""
        if self.byte_level:
            dec = self.byte_decoder
            try:
                return bytes(dec[c] for c in text)
            except KeyError:
                return text.encode("utf-8")
        if self.byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                pass
        if self.metaspace:
            return text.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")



class JsonTokenizer:
    """A model folder's tokenizer.json (and tokenizer_config.json, chat template) as a backend needs it."""

    def __init__(self, folder: Path, *, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None,
                 vocab_size: int | None = None, template_file: str | None = None) -> None:
        Tokenizer = require("tokenizers", extra="onnx", purpose="The onnxruntime backend",
                            backend="onnxruntime").Tokenizer
        tok_file = folder / "tokenizer.json"
        try:
            spec = json.loads(tok_file.read_text(encoding="utf-8"))
            self._tok = Tokenizer.from_str(json.dumps(spec))
            self._tok_plain = Tokenizer.from_str(json.dumps(spec))
            self._tok_plain.encode_special_tokens = True  # special-token text stays text (parse_special=False)
        except Exception as exc:
            raise InvalidModelFileError(f"{tok_file} is not a valid tokenizer file ({exc}).",
                                        fix="Copy tokenizer.json from the source checkpoint, or convert again.",
                                        path=str(tok_file)) from exc
        self.text = TokenText(spec, self._tok)
        self.file = tok_file  # llguidance reads it again for structured output (runtimes.onnx_base)
        tcfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                tcfg = {}
        eos_ids = [int(i) for i in eos_token_ids]
        self.bos_token_id = bos_token_id
        self.bos_token = self._special_text(tcfg.get("bos_token"), bos_token_id)
        self.eos_token = self._special_text(tcfg.get("eos_token"), eos_ids[0] if eos_ids else None)
        eog = set(eos_ids)
        for text in EOG_TEXTS:
            tid = self._tok.token_to_id(text)
            if tid is not None and tid in self.text.special:
                eog.add(tid)
        self.eog = frozenset(eog)
        self.chat_template = self._template(folder, tcfg, template_file)
        self.n_vocab = int(vocab_size or self._tok.get_vocab_size(with_added_tokens=True))

    def _special_text(self, value: Any, token_id: Any) -> str:
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
        if isinstance(token_id, int) and token_id >= 0:
            return self._tok.id_to_token(token_id) or ""
        return ""

    @staticmethod
    def _template(folder: Path, tcfg: dict[str, Any], template_file: str | None) -> str | None:
        if template_file and (folder / template_file).is_file():
            return (folder / template_file).read_text(encoding="utf-8")
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        t = tcfg.get("chat_template")
        if isinstance(t, list):  # named templates: take "default"
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) else None

    def encode(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tok = self._tok if parse_special else self._tok_plain
        return list(tok.encode(text, add_special_tokens=add_special).ids)
