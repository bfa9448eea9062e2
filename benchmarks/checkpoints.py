"""The Hugging Face checkpoint the benchmarks convert by default: SmolLM2-135M-Instruct derived from the embedded
GGUF by tests/hf_fixtures.py (cached like the tests' copy).  Imported by the bench_*.py scripts run from here."""

from __future__ import annotations

import sys
from pathlib import Path


def default_checkpoint() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from tests.hf_fixtures import smollm2_hf_checkpoint
    except ImportError:
        sys.exit("Pass a Hugging Face checkpoint folder (tests/hf_fixtures.py is not there to derive SmolLM2).")
    return Path(smollm2_hf_checkpoint())
