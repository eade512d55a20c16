"""Erasure coding of a snapshot into k data + m parity fragments, and back; and the buffers
fragments are received and coded into (`fresh_buffer`, `populate`: memory mapped in at once).

Data fragment i is bytes [i*F, (i+1)*F) of the snapshot (F = ceil(size / k), the last one
zero-padded), so data fragments cost nothing to make. Parity is computed stripe by stripe
(a few MiB from each data fragment at a time, so the working set stays in cache), and the
stripes can be spread over threads: numpy's XOR and zfec both release the GIL.
For one parity fragment XOR is the same protection at ~10x zfec's speed (BASELINES.md);
zfec (Reed-Solomon over GF(2^8)) serves m >= 2. Any k of the k+m fragments rebuild the bytes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
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


def fresh_buffer(size: int) -> memoryview:
    """`size` writable zero bytes to receive into: anonymous memory, its pages mapped in by one
    `populate` call (where `bytearray(size)` would zero them one page fault at a time).
    Unmapped when the last view goes."""
    mapping = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(mapping)[:size]
    populate(view)
    return view


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def populate(view: memoryview) -> None:
    """Maps in every page of a writable mapping now, in one system call, ready to be written.

    A first write to each 4 KiB page of a mapping, shared memory included, otherwise takes a
    page fault, which costs several times the copy on a VM (BASELINES.md); the kernel maps a
    whole range in far faster. Best effort: where the kernel lacks it, writes fault pages in.
    """
    if len(view) < 1 << 20 or _libc is None:
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    start = address & ~(mmap.PAGESIZE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + len(view) - start), _MADV_POPULATE_WRITE)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


def data_fragment(data: memoryview, scheme: Scheme, index: int) -> memoryview | bytes:
    """Data fragment `index` (< k): a view of `data`, or a padded copy for the last one."""
    start = index * scheme.fragment_bytes
    piece = data[start : min(start + scheme.fragment_bytes, scheme.size_bytes)]
    if len(piece) == scheme.fragment_bytes:
        return piece
    return bytes(piece) + bytes(scheme.fragment_bytes - len(piece))


def encode_parity(data: memoryview, scheme: Scheme, mapper: Mapper = map, stripe_bytes: int = STRIPE_BYTES) -> list[memoryview]:
    """The m parity fragments of `data` (len(data) == scheme.size_bytes)."""
    if len(data) != scheme.size_bytes:
        raise InvalidRequest(f"data is {len(data)} bytes, the scheme says {scheme.size_bytes}")
    parity = [fresh_buffer(scheme.fragment_bytes) for _ in range(scheme.m)]  # written whole below
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
    usable = _usable(fragments, scheme)
    size = scheme.fragment_bytes
    out = bytearray(size * scheme.k)
    present = [i for i in usable if i < scheme.k]
    for i in present:
        out[i * size : (i + 1) * size] = fragments[i]
    rebuild_missing(memoryview(out), {i: fragments[i] for i in usable if i >= scheme.k}, present, scheme, mapper, stripe_bytes)
    del out[scheme.size_bytes :]
    return out


def rebuild_missing(
    out: memoryview,
    parity: Mapping[int, memoryview | bytes],
    present: Iterable[int],
    scheme: Scheme,
    mapper: Mapper = map,
    stripe_bytes: int = STRIPE_BYTES,
) -> None:
    """Decodes in place: `out` (k * fragment_bytes) already holds the data fragments `present`
    at their places; the missing ones are rebuilt there from them and the `parity` fragments.
    Nothing is copied but what is rebuilt, so fragments can be received straight into `out`."""
    size = scheme.fragment_bytes
    if len(out) != size * scheme.k:
        raise InvalidRequest(f"decode buffer is {len(out)} bytes, expected {size * scheme.k}")
    placed = sorted({i for i in present if 0 <= i < scheme.k})
    fragments: dict[int, memoryview | bytes] = {i: out[i * size : (i + 1) * size] for i in placed}
    fragments |= {i: f for i, f in parity.items() if scheme.k <= i < scheme.k + scheme.m}
    usable = _usable(fragments, scheme)
    missing = [i for i in range(scheme.k) if i not in placed]
    if missing and size:
        _rebuild(out, fragments, usable, missing, scheme, mapper, stripe_bytes)


def _usable(fragments: Mapping[int, memoryview | bytes], scheme: Scheme) -> list[int]:
    """The k fragment indices a decode reads, data fragments first; raises unless there are k of the right size."""
    usable = sorted(i for i in fragments if 0 <= i < scheme.k + scheme.m)[: scheme.k]
    if len(usable) < scheme.k:
        raise InvalidRequest(f"{len(usable)} of the {scheme.k} fragments needed are present (have {sorted(fragments)})")
    for i in usable:
        if len(fragments[i]) != scheme.fragment_bytes:
            raise InvalidRequest(f"fragment {i} is {len(fragments[i])} bytes, expected {scheme.fragment_bytes}")
    return usable


def _rebuild(
    out: memoryview,
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
    view = out

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
