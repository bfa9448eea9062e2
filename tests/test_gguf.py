"""GGUF header checks: malformed files get typed errors before llama.cpp (which may abort the process) sees them."""

from __future__ import annotations

import struct

import pytest

import edgelm
import json
import os

from edgelm.formats import gguf
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


def _walks(monkeypatch, home) -> list[int]:
    """Count the string arrays a read steps through (the rest it jumps over from edgelm's index of array ends),
    with ``home`` as $EDGELM_HOME."""
    monkeypatch.setenv("EDGELM_HOME", str(home))
    walked: list[int] = []
    step = gguf._Reader.skip_strings

    def counting(self, count):
        walked.append(count)
        return step(self, count)

    monkeypatch.setattr(gguf._Reader, "skip_strings", counting)
    monkeypatch.setattr(gguf, "ARRAY_ENDS", gguf._ArrayEnds())  # a fresh process's view of $EDGELM_HOME
    return walked


def test_a_second_read_jumps_over_the_vocabulary(default_gguf, tmp_path, monkeypatch):
    walked = _walks(monkeypatch, tmp_path / "home")
    first = read_header(default_gguf)
    assert walked == [49152, 48900]  # the tokens and the merges, stepped through once
    monkeypatch.setattr(gguf, "ARRAY_ENDS", gguf._ArrayEnds())  # another process, reading the index from disk
    second = read_header(default_gguf)
    assert walked == [49152, 48900]  # not again
    assert second.metadata == first.metadata and second.tensors == first.tensors
    assert second.data_offset == first.data_offset


def test_a_wrong_array_end_is_walked_again_and_corrected(default_gguf, tmp_path, monkeypatch):
    copy = tmp_path / "m.gguf"
    copy.write_bytes(default_gguf.read_bytes())
    walked = _walks(monkeypatch, tmp_path / "home")
    good = read_header(copy)
    index = gguf.edgelm_home() / gguf._ArrayEnds.NAME
    table = json.loads(index.read_text())
    (key, ends), = [(k, dict(v)) for k, v in table.items() if k.startswith(os.path.realpath(copy))]
    first_array = min(ends, key=int)
    table[key][first_array] += 3  # lands inside a token: what follows is not a key any more
    index.write_text(json.dumps(table))
    monkeypatch.setattr(gguf, "ARRAY_ENDS", gguf._ArrayEnds())
    walked.clear()
    assert read_header(copy).metadata == good.metadata
    assert walked == [49152, 48900]  # walked after the index misled it
    assert json.loads(index.read_text())[key] == ends  # and corrected


def test_a_changed_file_is_not_read_with_the_old_index(default_gguf, tmp_path, monkeypatch):
    copy = tmp_path / "m.gguf"
    copy.write_bytes(default_gguf.read_bytes())
    walked = _walks(monkeypatch, tmp_path / "home")
    read_header(copy)
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))  # rewritten, same size
    walked.clear()
    read_header(copy)
    assert walked == [49152, 48900]


def test_an_unwritable_home_only_makes_reading_slower(default_gguf, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    walked = _walks(monkeypatch, blocked / "home")  # cannot be created
    assert read_header(default_gguf).quantization == "Q4_1"
    assert read_header(default_gguf).quantization == "Q4_1"
    assert walked == [49152, 48900]  # kept in memory for this process, nothing written


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
