"""What each NPU execution provider accepts in a graph (data in ep_rules/*.json): static shapes, its op list, the
MatMul input type pairs its hardware runs, whether int64 arithmetic is allowed.  These are hardware facts, kept here
with the device profiles; :mod:`edgelm.converters.onnx.lint` checks graphs against them."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from edgelm.errors import InvalidParameterError


@lru_cache(maxsize=1)
def ep_rules() -> dict[str, dict[str, Any]]:
    """Every rule table by name (qnn-htp, openvino-npu, ...)."""
    out = {}
    for entry in resources.files("edgelm.platforms").joinpath("ep_rules").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            out[data["name"]] = data
    return dict(sorted(out.items()))


def rule_table(name: str) -> dict[str, Any]:
    tables = ep_rules()
    if name not in tables:
        raise InvalidParameterError(f"Unknown execution-provider rule table {name!r}.",
                                    fix=f"Use one of: {', '.join(tables)}.", parameter="ep_rules", value=name)
    return tables[name]
