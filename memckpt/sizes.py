"""Byte sizes as people write them (`8GiB`, `512MB`, `1e9`) and as they read them."""

from __future__ import annotations

import re

from memckpt.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parses `1GiB`, `512MiB`, `4G` (binary), `2GB` (decimal) or a plain number of bytes."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"size {text!r} is not understood: write e.g. 8GiB, 512MiB, 2GB or 1048576")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size_bytes: float) -> str:
    """`1.5 GiB`-style text for logs and messages."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
