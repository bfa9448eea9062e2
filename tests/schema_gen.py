"""Random JSON schemas for the structured-output property test (a seeded generator: the same schemas every run).

Objects nest (depth <= 2) with 1-3 properties and a random subset required; leaves are strings (bounded length or
a pattern-free enum), integers and numbers with bounds, booleans, enums and arrays with bounds on their length.
Strings carry maxLength and arrays maxItems, so every schema has short instances a small token budget can hold
(the constraint guarantees the shape, not that a model ends a free string in time).
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ["city", "name", "age", "color", "count", "price", "tags", "ok", "items", "size", "kind", "score", "id",
         "unit", "level", "owner", "open", "rank", "code", "note"]
ENUMS = [["red", "green", "blue"], ["small", "large"], ["yes", "no", "maybe"], ["cat", "dog"], ["low", "high"]]


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "int_enum"])
    if kind == "string":
        return {"type": "string", "minLength": rng.choice([0, 1]), "maxLength": rng.choice([4, 8, 12])}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([0, 5, 100, 1000])}
    if kind == "number":
        lo = rng.choice([-10.5, 0, 1, 100])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([1, 10, 1000])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": list(rng.choice(ENUMS))}
    if kind == "int_enum":
        return {"type": "integer", "enum": sorted(rng.sample(range(1, 20), 3))}
    items = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": list(rng.choice(ENUMS))},
                        {"type": "boolean"}])
    lo = rng.choice([0, 1])
    return {"type": "array", "items": items, "minItems": lo, "maxItems": lo + rng.choice([1, 2])}


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(WORDS, rng.randint(1, 3))
    props = {n: (_object(rng, depth + 1) if depth < 2 and rng.random() < 0.25 else _leaf(rng)) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def schemas(n: int, seed: int = 24) -> list[dict[str, Any]]:
    """``n`` distinct schemas, the same for the same seed."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        s = _object(rng, 0)
        key = repr(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
