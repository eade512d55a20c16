"""`verify`: is a persisted DCP checkpoint complete and intact, and if not, exactly what is wrong. File I/O.

Without `.memckpt.json` (a checkpoint stock `dcp.save` wrote) only the structure is checked:
`.metadata` readable, every chunk stored inside an existing file, chunks tiling each tensor.
With it, also each file's size, each item's crc32c, and that `.metadata` is the one these
files were finalized with.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from memckpt.agent.dcp import CHECKSUMS, CHUNK_BYTES, METADATA
from memckpt.agent.dcp_metadata import RankWriteResult, WrittenItem, merge_results, tiling_problem
from memckpt.errors import MemckptError


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    directory: Path
    complete: bool  # `.metadata` exists
    problems: tuple[str, ...]  # each says what is wrong and where; empty when intact
    notes: tuple[str, ...] = ()  # what could not be checked, and why
    checked_bytes: int = 0

    @property
    def is_ok(self) -> bool:
        return self.complete and not self.problems


def verify(directory: Path, *, checksums: bool = True, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Checks `directory`; `checksums=False` skips reading the data (sizes and structure only).
    `progress(checked_bytes, total_bytes)` hears of each item read."""
    if not (directory / METADATA).is_file():
        present = sorted(p.name for p in directory.glob("__*")) if directory.is_dir() else []
        what = f"no {METADATA} (the checkpoint was never finalized); files present: {', '.join(present) or 'none'}"
        return VerifyReport(directory=directory, complete=False, problems=(what,))
    try:
        metadata = pickle.loads((directory / METADATA).read_bytes())
        if not isinstance(metadata, Metadata):
            raise TypeError(f"it holds a {type(metadata).__name__}")
    except Exception as exc:  # any unpickling failure means the same: unreadable
        return VerifyReport(directory=directory, complete=True, problems=(f"{METADATA} cannot be read: {exc}",))
    problems = list(_structure_problems(directory, metadata))
    if not (directory / CHECKSUMS).is_file():
        note = f"no {CHECKSUMS}: not written by memckpt, so sizes and checksums were not checked"
        return VerifyReport(directory=directory, complete=True, problems=tuple(problems), notes=(note,))
    try:
        results = _read_checksums(directory, metadata)
    except (MemckptError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{CHECKSUMS} is unusable or disagrees with {METADATA}: {exc}")
        return VerifyReport(directory=directory, complete=True, problems=tuple(problems))
    checked = 0
    total = sum(f.size_bytes for result in results for f in result.files) if checksums else 0
    for result in results:
        for found in _file_problems(directory, result, checksums):
            if isinstance(found, int):
                checked += found
                if progress is not None:
                    progress(checked, total)
            else:
                problems.append(found)
    return VerifyReport(directory=directory, complete=True, problems=tuple(problems), checked_bytes=checked)


def _structure_problems(directory: Path, metadata: Metadata) -> Iterator[str]:
    storage = metadata.storage_data or {}
    sizes: dict[str, int | None] = {}
    for index, info in storage.items():
        name = info.relative_path
        if name not in sizes:
            path = directory / name
            sizes[name] = path.stat().st_size if path.is_file() and path.parent == directory else None
            if sizes[name] is None:
                yield f"file {name} is missing"
        size = sizes[name]
        if size is not None and info.offset + info.length > size:
            yield f"key {index.fqn!r} lies at bytes {info.offset}..{info.offset + info.length} of {name}, which has {size}"
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            if MetadataIndex(fqn) not in storage:
                yield f"key {fqn!r} has no stored bytes"
            continue
        for chunk in md.chunks:
            if MetadataIndex(fqn, chunk.offsets) not in storage:
                yield f"tensor {fqn!r}: chunk {list(chunk.sizes)} at {list(chunk.offsets)} has no stored bytes"
        problem = tiling_problem(fqn, md)
        if problem:
            yield problem


def _read_checksums(directory: Path, metadata: Metadata) -> list[RankWriteResult]:
    raw = json.loads((directory / CHECKSUMS).read_bytes())
    results = [RankWriteResult.from_json(r) for r in raw["ranks"]]
    merged = merge_results(results, world_size=int(raw["world_size"]), checkpoint_id=str(directory))
    if merged.metadata.state_dict_metadata != metadata.state_dict_metadata:
        raise ValueError("they describe different keys, shapes or chunks")
    if merged.metadata.storage_data != metadata.storage_data:
        raise ValueError("they place the stored items differently")
    return results


def _file_problems(directory: Path, result: RankWriteResult, checksums: bool) -> Iterator[str | int]:
    """Problems of one rank's files, and (as ints) the bytes checked."""
    for f in result.files:
        path = directory / f.name
        if not path.is_file():
            yield f"rank {result.rank}: file {f.name} is missing"
            continue
        size = path.stat().st_size
        if size != f.size_bytes:
            yield f"rank {result.rank}: file {f.name} is {size} bytes; {f.size_bytes} were written"
            continue
        items = sorted((i for i in result.items if i.file == f.name), key=lambda i: i.offset)
        end = 0
        for item in items:
            if item.offset != end:
                yield f"rank {result.rank}: bytes {end}..{item.offset} of {f.name} belong to no item"
            end = item.offset + item.length
        if end != size:
            yield f"rank {result.rank}: bytes {end}..{size} of {f.name} belong to no item"
        if checksums:
            yield from _checksum_problems(path, result.rank, items)


def _checksum_problems(path: Path, rank: int, items: list[WrittenItem]) -> Iterator[str | int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for item in items:
            crc = 0
            for at in range(item.offset, item.offset + item.length, CHUNK_BYTES):
                crc = int(crc32c.crc32c(os.pread(fd, min(CHUNK_BYTES, item.offset + item.length - at), at), crc))
            yield item.length
            if crc != item.crc32c:
                where = f"bytes {item.offset}..{item.offset + item.length} of {path.name}"
                yield f"rank {rank}: key {item.fqn!r} ({where}) has crc32c {crc:08x}; {item.crc32c:08x} was written"
    finally:
        os.close(fd)
