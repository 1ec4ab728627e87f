"""Sizes of memory in words: "8GiB" read as bytes, bytes written as "8.0 GiB"."""

from __future__ import annotations

import re

from probe.errors import ProbeError

__all__ = ["format_bytes", "parse_size"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of "8GiB", "512MB", "2e9" (bytes); a ProbeError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise ProbeError(f"--memory-budget {text!r} is not a size; give a number of bytes with a unit, e.g. 8GiB, "
                         "512MiB or 16GB.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
