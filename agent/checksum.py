"""Checksums of a slot: crc32c per chunk of the data, then one of the metadata.

Chunks let several threads verify one slot at once (crc32c releases the GIL) and say
where a corruption lies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import crc32c

CHUNK_BYTES = 64 << 20

Mapper = Callable[[Callable[[memoryview], int], Iterable[memoryview]], Iterator[int]]


def chunk_checksums(
    buffer: memoryview,
    data_size_bytes: int,
    meta: bytes,
    *,
    mapper: Mapper = map,
    keep_going: Callable[[], bool] | None = None,
) -> tuple[int, ...] | None:
    """crc32c of each CHUNK_BYTES of `buffer[:data_size_bytes]`, then of `meta`.

    `mapper` may be an executor's `map` to spread the chunks over threads. Returns None
    if `keep_going()` turns false between chunks (the slot moved on; the result is moot).
    """

    def one(chunk: memoryview) -> int:
        if keep_going is not None and not keep_going():
            raise _Stopped
        return int(crc32c.crc32c(chunk))

    chunks = (buffer[start : min(start + CHUNK_BYTES, data_size_bytes)] for start in range(0, data_size_bytes, CHUNK_BYTES))
    try:
        sums = tuple(mapper(one, chunks))
    except _Stopped:
        return None
    return (*sums, int(crc32c.crc32c(meta)))


def chunk_count(data_size_bytes: int) -> int:
    """How many data chunks `chunk_checksums` sums (the metadata's sum follows them)."""
    return -(-data_size_bytes // CHUNK_BYTES)


_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def combine_crc32c(crc_a: int, crc_b: int, length_b: int) -> int:
    """crc32c of A + B from crc32c(A), crc32c(B) and len(B), in log(len(B)) steps of 32x32
    matrices over GF(2) (zlib's crc32_combine): for pieces of any length, a few milliseconds."""
    if length_b <= 0:
        return crc_a
    odd = [_CRC32C_POLY] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four
    while True:  # each round: the operator for twice as many zero bits, applied where len(B) has a bit
        even = _square(odd)
        if length_b & 1:
            crc_a = gf2_times(even, crc_a)
        length_b >>= 1
        if not length_b:
            break
        odd = _square(even)
        if length_b & 1:
            crc_a = gf2_times(odd, crc_a)
        length_b >>= 1
        if not length_b:
            break
    return crc_a ^ crc_b


def gf2_times(matrix: list[int] | tuple[int, ...], vector: int) -> int:
    """The 32x32 matrix over GF(2) given by its columns, times a 32-bit vector."""
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [gf2_times(matrix, column) for column in matrix]


def describe_mismatch(expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    """Which chunks differ, in words: 'bytes 64.0 MiB..128.0 MiB' or 'the metadata'."""
    if len(expected) != len(found):
        return f"{len(found)} chunks where {len(expected)} were recorded"
    bad = [i for i, (e, f) in enumerate(zip(expected, found)) if e != f]
    parts = []
    for i in bad:
        if i == len(expected) - 1:
            parts.append("the metadata")
        else:
            parts.append(f"bytes {i * CHUNK_BYTES}..{(i + 1) * CHUNK_BYTES}")
    return ", ".join(parts)


class _Stopped(Exception):
    pass
