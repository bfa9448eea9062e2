"""GGUF header checks: malformed files get typed errors before llama.cpp (which may abort the process) sees them."""

from __future__ import annotations

import struct

import pytest

import edgelm
from edgelm.formats.gguf import read_header

from .conftest import run_cli


def test_reads_the_real_model_header(default_gguf):
    h = read_header(default_gguf)
    assert h.architecture == "llama"
    assert h.quantization == "Q4_1"
    assert h.context_length == 8192
    assert 130_000_000 < h.parameters < 140_000_000
    assert h.arch_value("block_count") == 30
    assert "<|im_start|>" in h.chat_template
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 49152  # long string arrays are counted, not decoded
    assert h.required_size <= h.file_size


def _truncated_copy(src, dst, keep: int):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(keep))
    return dst


def test_truncated_file_is_refused_with_sizes(default_gguf, tmp_path):
    bad = _truncated_copy(default_gguf, tmp_path / "cut.gguf", 50_000_000)
    with pytest.raises(edgelm.InvalidModelFileError) as err:
        edgelm.load(bad)
    msg = str(err.value)
    assert "truncated" in msg and "50,000,000" in msg and str(bad) in msg
    assert isinstance(err.value, ValueError)


def test_file_cut_inside_the_header_is_refused(default_gguf, tmp_path):
    bad = _truncated_copy(default_gguf, tmp_path / "head.gguf", 4096)
    with pytest.raises(edgelm.InvalidModelFileError, match="header ends early"):
        read_header(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(edgelm.InvalidModelFileError, match="not a GGUF file"):
        read_header(bad)


def test_absurd_counts_are_refused_without_allocating(tmp_path):
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 1) + b"\0" * 64)
    with pytest.raises(edgelm.InvalidModelFileError, match="implausible"):
        read_header(bad)


def test_unknown_version(tmp_path):
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + b"\0" * 64)
    with pytest.raises(edgelm.InvalidModelFileError, match="version 9"):
        read_header(bad)


@pytest.mark.slow
def test_truncated_file_through_the_cli_is_a_message_not_a_crash(default_gguf, tmp_path):
    bad = _truncated_copy(default_gguf, tmp_path / "cut.gguf", 60_000_000)
    result = run_cli("run", str(bad), "Hello")
    assert result.returncode == 4, result.stderr
    assert "truncated" in result.stderr and "Traceback" not in result.stderr
