"""Erasure coding of a snapshot into k data + m parity fragments, and back. Pure logic.

Data fragment i is bytes [i*F, (i+1)*F) of the snapshot (F = ceil(size / k), the last one
zero-padded), so data fragments cost nothing to make. Parity is computed stripe by stripe
(a few MiB from each data fragment at a time, so the working set stays in cache), and the
stripes can be spread over threads: numpy's XOR and zfec both release the GIL.
For one parity fragment XOR is the same protection at ~10x zfec's speed (BASELINES.md);
zfec (Reed-Solomon over GF(2^8)) serves m >= 2. Any k of the k+m fragments rebuild the bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import zfec

from memckpt.errors import InvalidRequest

STRIPE_BYTES = 4 << 20

Mapper = Callable[[Callable[[int], None], Iterable[int]], Iterator[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Scheme:
    """k data fragments + m parity fragments of a snapshot of `size_bytes`."""

    k: int
    m: int
    size_bytes: int

    def __post_init__(self) -> None:
        if not (1 <= self.k <= 128 and 0 <= self.m <= 128 and self.k + self.m <= 256):
            raise InvalidRequest(f"erasure scheme k={self.k} m={self.m} is out of range (1<=k, 0<=m, k+m<=256)")
        if self.size_bytes < 0:
            raise InvalidRequest(f"snapshot size {self.size_bytes} is negative")

    @property
    def fragment_bytes(self) -> int:
        return math.ceil(self.size_bytes / self.k) if self.size_bytes else 0

    def stripes(self, stripe_bytes: int = STRIPE_BYTES) -> list[tuple[int, int]]:
        """(start, end) of each stripe inside a fragment."""
        size = self.fragment_bytes
        return [(start, min(start + stripe_bytes, size)) for start in range(0, size, stripe_bytes)]


def data_fragment(data: memoryview, scheme: Scheme, index: int) -> memoryview | bytes:
    """Data fragment `index` (< k): a view of `data`, or a padded copy for the last one."""
    start = index * scheme.fragment_bytes
    piece = data[start : min(start + scheme.fragment_bytes, scheme.size_bytes)]
    if len(piece) == scheme.fragment_bytes:
        return piece
    return bytes(piece) + bytes(scheme.fragment_bytes - len(piece))


def encode_parity(data: memoryview, scheme: Scheme, mapper: Mapper = map, stripe_bytes: int = STRIPE_BYTES) -> list[bytearray]:
    """The m parity fragments of `data` (len(data) == scheme.size_bytes)."""
    if len(data) != scheme.size_bytes:
        raise InvalidRequest(f"data is {len(data)} bytes, the scheme says {scheme.size_bytes}")
    parity = [bytearray(scheme.fragment_bytes) for _ in range(scheme.m)]
    if scheme.m == 0 or not scheme.fragment_bytes:
        return parity
    fragments = [data_fragment(data, scheme, i) for i in range(scheme.k)]
    encoder = zfec.Encoder(scheme.k, scheme.k + scheme.m) if scheme.m >= 2 else None
    stripes = scheme.stripes(stripe_bytes)

    def one(i: int) -> None:
        start, end = stripes[i]
        blocks = [memoryview(f)[start:end] for f in fragments]
        if encoder is None:
            _xor_into(memoryview(parity[0])[start:end], blocks)
        else:
            wanted = tuple(range(scheme.k, scheme.k + scheme.m))
            for j, block in enumerate(encoder.encode(tuple(blocks), wanted)):
                parity[j][start:end] = block

    for _ in mapper(one, range(len(stripes))):
        pass
    return parity


def decode(
    fragments: Mapping[int, memoryview | bytes], scheme: Scheme, mapper: Mapper = map, stripe_bytes: int = STRIPE_BYTES
) -> bytearray:
    """The snapshot's bytes from any k fragments, keyed by fragment index (0..k+m-1)."""
    usable = sorted(i for i in fragments if 0 <= i < scheme.k + scheme.m)[: scheme.k]
    if len(usable) < scheme.k:
        raise InvalidRequest(f"{len(usable)} of the {scheme.k} fragments needed are present (have {sorted(fragments)})")
    size = scheme.fragment_bytes
    for i in usable:
        if len(fragments[i]) != size:
            raise InvalidRequest(f"fragment {i} is {len(fragments[i])} bytes, expected {size}")
    out = bytearray(size * scheme.k)
    present = [i for i in usable if i < scheme.k]
    for i in present:
        out[i * size : (i + 1) * size] = fragments[i]
    missing = [i for i in range(scheme.k) if i not in present]
    if missing and size:
        _rebuild(out, fragments, usable, missing, scheme, mapper, stripe_bytes)
    del out[scheme.size_bytes :]
    return out


def _rebuild(
    out: bytearray,
    fragments: Mapping[int, memoryview | bytes],
    usable: list[int],
    missing: list[int],
    scheme: Scheme,
    mapper: Mapper,
    stripe_bytes: int,
) -> None:
    size = scheme.fragment_bytes
    stripes = scheme.stripes(stripe_bytes)
    decoder = zfec.Decoder(scheme.k, scheme.k + scheme.m) if scheme.m >= 2 else None
    view = memoryview(out)

    def one(s: int) -> None:
        start, end = stripes[s]
        blocks = [memoryview(fragments[i])[start:end] for i in usable]
        if decoder is None:  # XOR: the one missing data fragment is the XOR of all the others
            (lost,) = missing
            _xor_into(view[lost * size + start : lost * size + end], blocks)
        else:
            primary = decoder.decode(tuple(blocks), tuple(usable))
            for i in missing:
                view[i * size + start : i * size + end] = primary[i]

    for _ in mapper(one, range(len(stripes))):
        pass


def _xor_into(target: memoryview, blocks: list[memoryview]) -> None:
    acc = np.frombuffer(target, dtype=np.uint8)
    np.copyto(acc, np.frombuffer(blocks[0], dtype=np.uint8))
    for block in blocks[1:]:
        np.bitwise_xor(acc, np.frombuffer(block, dtype=np.uint8), out=acc)
