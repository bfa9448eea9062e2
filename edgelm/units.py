"""Sizes as people read them (one formatter for every message, table and progress line)."""

from __future__ import annotations


def human_bytes(n: int | float) -> str:
    """1536 -> "2 KB", 5_000_000 -> "4.8 MB", 380_000_000 -> "362 MB", 3 << 30 -> "3.00 GB" (binary units)."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GB"
    if n >= 100 * 1024**2:
        return f"{n / 1024**2:.0f} MB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{int(n)} B"
