"""Where each tensor of a snapshot lives in a slot. Pure logic.

A layout assigns every tensor leaf an aligned, non-overlapping byte range, in leaf order.
It depends only on the leaves' dtypes and shapes, so it is computed once and reused until
a shape changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALIGNMENT_BYTES = 256  # keeps every tensor cache-line and SIMD aligned in the slot


@dataclass(frozen=True, slots=True, kw_only=True)
class LeafSpec:
    """What the layout needs to know of one tensor leaf."""

    dtype: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    specs: tuple[LeafSpec, ...]
    placements: tuple[Placement, ...]
    size_bytes: int


def align_up(value: int, alignment: int = ALIGNMENT_BYTES) -> int:
    return (value + alignment - 1) // alignment * alignment


def compute_layout(specs: tuple[LeafSpec, ...], alignment: int = ALIGNMENT_BYTES) -> Layout:
    """Packs the leaves in order, each at an `alignment`-aligned offset."""
    placements = []
    offset = 0
    for spec in specs:
        placements.append(Placement(offset=offset, nbytes=spec.nbytes))
        offset = align_up(offset + spec.nbytes, alignment)
    return Layout(specs=specs, placements=tuple(placements), size_bytes=max(offset, alignment))
