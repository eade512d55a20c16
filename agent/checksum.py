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
