"""The GPTQ calibration mix (converters/calibration.py): deterministic, every kind present, never the evaluation
texts, and the int8 graph rewrite's name mapping (converters/onnx_mixed.py).  Fast: no model."""

from __future__ import annotations

import re

import pytest

from edgelm.converters import calibration
from edgelm.converters.calibration import calibration_mix
from edgelm.quality import eval_text


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def test_the_mix_is_deterministic_and_draws_on_every_kind():
    a = calibration_mix()
    assert a == calibration_mix()
    shares = {kind: calibration_mix([kind], chars_per_kind=20_000) for kind in calibration.KINDS}
    for kind, share in shares.items():
        assert share, f"no {kind} text on this machine"
    # each kind's share is in the mix, in order, and they differ from each other
    for kind in calibration.KINDS:
        first = next(p for p in shares[kind].split("\n\n") if len(p) > 80)
        assert first in a, kind
    assert len(set(shares.values())) == len(shares)


def test_the_mix_never_contains_the_evaluation_text_or_a_held_out_text():
    held_out = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
                "associated documentation files (the \"Software\"), to deal in the Software without restriction")
    plain = calibration_mix(["licences"])
    assert words(held_out)[:12] == words(plain[plain.lower().find("permission is hereby granted"):])[:12], \
        "the MIT licence text is expected among the installed distributions' licences"
    mix = calibration_mix(held_out=[held_out])
    runs = lambda text, n: {" ".join(w[i:i + n]) for w in [words(text)] for i in range(len(w) - n + 1)}  # noqa: E731
    mixed = runs(mix, 12)
    assert not runs(eval_text(), 12) & mixed  # no 12-word run of the built-in evaluation text
    assert not runs(held_out, 12) & mixed


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="novels"):
        calibration_mix(["novels"])


def test_markup_is_read_as_text():
    assert calibration.html_to_text("<p>Hello <b>world</b></p><script>x()</script><p>Next</p>").split() == \
        ["Hello", "world", "Next"]
    md = "[![build](https://x/badge.svg)](https://x) See [the docs](https://d) ![logo](l.png) <b>bold</b>"
    assert calibration.markdown_to_text(md).split() == ["See", "the", "docs", "bold"]


def test_int8_node_names_follow_the_builder():
    from edgelm.converters.onnx_mixed import group, node_name

    assert node_name("model.layers.3.mlp.down_proj") == "/model/layers.3/mlp/down_proj/MatMulNBits"
    assert node_name("model.layers.0.self_attn.k_proj") == "/model/layers.0/attn/qkv_proj/MatMulNBits"
    assert node_name("model.layers.7.self_attn.o_proj") == "/model/layers.7/attn/o_proj/MatMulNBits"
    assert node_name("lm_head") == "/lm_head/MatMulNBits"
    assert group("model.layers.2.self_attn.v_proj") == [f"model.layers.2.self_attn.{p}_proj" for p in "qkv"]
    assert group("model.layers.2.mlp.up_proj") == ["model.layers.2.mlp.up_proj"]
    with pytest.raises(ValueError, match="embed_tokens"):
        node_name("model.embed_tokens")
