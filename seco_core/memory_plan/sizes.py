"""Byte units: the plan's sizes as people write them (SECO_MEMORY_BUDGET=24GiB) and read them."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
_UNITS.update({"kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4})


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '1.5GB' -> 1500000000, '512' -> 512 (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 1.5GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int | float) -> str:
    """Binary units: 1536 -> '1.50 KiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
