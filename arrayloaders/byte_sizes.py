"""Sizes given as text: ``memory_budget="2GiB"`` for the conversion and the loader alike."""

from __future__ import annotations

import re

import numpy as np

__all__ = ["parse_bytes"]


def parse_bytes(value: int | str) -> int:
    """``"512MB"``, ``"2GiB"``, ``"1.5G"`` or an int of bytes -> bytes."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"cannot parse a size from {value!r} (examples: 512MB, 2GiB, 1000000)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))
