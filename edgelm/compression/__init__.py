"""Compression beyond quantization: remove decoder blocks and MLP neurons, heal, and measure what it cost.

    import edgelm
    report = edgelm.compress("SmolLM2-135M-Instruct/", "smollm2-small/", drop_layers=4, budget="30m")
    print(report.table())

See :func:`edgelm.compression.api.compress`.
"""

from .api import compress
from .distill import Budget, parse_budget
from .families import FAMILIES
from .report import CompressionReport

__all__ = ["compress", "CompressionReport", "Budget", "parse_budget", "FAMILIES"]
