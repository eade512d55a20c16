"""What each rank wrote, and the global DCP `Metadata` merged from all of them. Pure logic.

A `RankWriteResult` is plain data (`to_json`/`from_json`) so it can travel from the agent
that wrote a rank's files to whoever finalizes the checkpoint. `merge_results` builds the
`Metadata` that stock `FileSystemReader` + `DefaultLoadPlanner` read: one entry per key,
chunks of sharded tensors side by side, replicated items (plain tensors, non-tensor values,
replicated DTensor chunks) kept once, from the lowest rank, as `dedup_save_plans` would.
It refuses a set of ranks that is not exactly 0..world_size-1 and tensors whose chunks do
not tile them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from memckpt.agent.dcp_plan import PathItem, torch_dtype
from memckpt.errors import InvalidRequest

FORMAT = 1
_FILE_NAME = re.compile(r"^__(\d+)_(\d+)\.distcp$")  # DCP's names: __{rank}_{n}.distcp
_MAX_LISTED = 8  # problems named in one error message


class ItemKind(enum.Enum):
    TENSOR = "tensor"  # a whole (plain) tensor: one chunk at offset 0
    SHARD = "shard"  # a DTensor's local shard: one chunk of the global tensor
    BYTES = "bytes"  # any other value, as torch.save(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenItem:
    """One stored item: `length` bytes at `offset` of `file`, whose crc32c is `crc32c`."""

    fqn: str
    path: tuple[PathItem, ...]
    kind: ItemKind
    file: str
    offset: int
    length: int
    crc32c: int
    dtype: str = ""  # tensors only, as in `torch.<dtype>`
    size: tuple[int, ...] = ()  # the global tensor's shape
    chunk_offsets: tuple[int, ...] = ()
    chunk_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenFile:
    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RankWriteResult:
    """Everything the global metadata and `verify` need of one rank's files."""

    rank: int
    files: tuple[WrittenFile, ...]
    items: tuple[WrittenItem, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "rank": self.rank,
            "files": [{"name": f.name, "size_bytes": f.size_bytes} for f in self.files],
            "items": [_item_to_json(i) for i in self.items],
        }

    @staticmethod
    def from_json(raw: Any) -> RankWriteResult:
        """Parses and checks a result (it may come from another machine): raises InvalidRequest."""
        try:
            if raw["format"] != FORMAT:
                raise InvalidRequest(f"rank write result format {raw['format']!r} is not {FORMAT}")
            result = RankWriteResult(
                rank=_int(raw["rank"]),
                files=tuple(WrittenFile(name=str(f["name"]), size_bytes=_int(f["size_bytes"])) for f in raw["files"]),
                items=tuple(_item_from_json(i) for i in raw["items"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed rank write result: {type(exc).__name__}: {exc}") from exc
        check_result(result)
        return result


@dataclass(frozen=True, slots=True, kw_only=True)
class MergedCheckpoint:
    metadata: Metadata
    divergent: tuple[str, ...] = ()  # keys whose replicated copies differ between ranks (lowest rank kept)
    referenced_bytes: int = 0  # bytes of the items `metadata` points to
    unreferenced_bytes: int = 0  # replicated copies written but not used
    ranks: tuple[int, ...] = ()


def check_result(result: RankWriteResult) -> None:
    """Checks one rank's result on its own: file names, item ranges inside their files."""
    sizes: dict[str, int] = {}
    for f in result.files:
        match = _FILE_NAME.match(f.name)
        if match is None or int(match.group(1)) != result.rank:
            raise InvalidRequest(f"rank {result.rank} names a file {f.name!r}; expected __{result.rank}_<n>.distcp")
        if f.size_bytes < 0 or f.name in sizes:
            raise InvalidRequest(f"rank {result.rank} lists file {f.name!r} twice or with a negative size")
        sizes[f.name] = f.size_bytes
    for item in result.items:
        where = f"rank {result.rank} item {item.fqn!r}"
        if item.file not in sizes:
            raise InvalidRequest(f"{where} is in {item.file!r}, which the rank did not write")
        if item.offset < 0 or item.length < 0 or item.offset + item.length > sizes[item.file]:
            raise InvalidRequest(
                f"{where} lies at bytes {item.offset}..{item.offset + item.length} of {item.file!r} ({sizes[item.file]} bytes)"
            )
        if item.kind is not ItemKind.BYTES:
            torch_dtype(item.dtype)
            if not len(item.size) == len(item.chunk_offsets) == len(item.chunk_sizes):
                raise InvalidRequest(f"{where}: size, chunk offsets and chunk sizes have different ranks")


def merge_results(
    results: Sequence[RankWriteResult], *, world_size: int, checkpoint_id: str, save_id: str | None = None
) -> MergedCheckpoint:
    """The global metadata of a checkpoint whose ranks wrote `results`.

    Raises:
        InvalidRequest: a rank is missing, repeated or out of range; ranks disagree on a key's
            kind, dtype or shape; or the chunks of a tensor overlap, stick out or leave a gap.
    """
    _check_ranks([r.rank for r in results], world_size)
    ordered = sorted(results, key=lambda r: r.rank)
    for result in ordered:
        check_result(result)
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    paths: dict[str, tuple[PathItem, ...]] = {}
    kept: dict[tuple[str, tuple[int, ...]], tuple[int, WrittenItem]] = {}
    chunk_ranks: dict[str, list[int]] = {}
    divergent: dict[str, None] = {}
    unreferenced = 0
    for result in ordered:
        for item in result.items:
            where = f"key {item.fqn!r} of rank {result.rank}"
            _check_same_key(state, paths, item, where)
            key = (item.fqn, item.chunk_offsets)
            if key in kept:
                first_rank, first = kept[key]
                if first.chunk_sizes != item.chunk_sizes:
                    raise InvalidRequest(
                        f"{where} is a chunk of {list(item.chunk_sizes)} at {list(item.chunk_offsets)}; "
                        f"rank {first_rank} wrote {list(first.chunk_sizes)} there"
                    )
                if first.crc32c != item.crc32c:
                    divergent[item.fqn] = None
                unreferenced += item.length
                continue
            kept[key] = (result.rank, item)
            _add(state, storage, item)
            chunk_ranks.setdefault(item.fqn, []).append(result.rank)
    problems = [
        problem
        for fqn, md in state.items()
        if isinstance(md, TensorStorageMetadata)
        for problem in [tiling_problem(fqn, md, chunk_ranks[fqn], world_size)]
        if problem
    ]
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise InvalidRequest("; ".join(problems[:_MAX_LISTED]) + more)
    metadata = Metadata(
        state_dict_metadata=state,
        planner_data=paths,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id),
        version=CURRENT_DCP_VERSION,
    )
    return MergedCheckpoint(
        metadata=metadata,
        divergent=tuple(divergent),
        referenced_bytes=sum(info.length for info in storage.values()),
        unreferenced_bytes=unreferenced,
        ranks=tuple(r.rank for r in ordered),
    )


def tiling_problem(fqn: str, md: TensorStorageMetadata, ranks: Sequence[int] | None = None, world_size: int = 0) -> str:
    """Why the chunks of `md` do not tile the tensor exactly ('' when they do).

    `ranks[i]` is the rank that wrote chunk i, when known: the message then names them.
    """
    size = tuple(md.size)
    name = f"tensor {fqn!r} {list(size)}"
    for i, chunk in enumerate(md.chunks):
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        outside = len(offsets) != len(size) or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, size))
        if outside:
            return f"{name}: chunk {list(sizes)} at {list(offsets)}{_by(ranks, i)} lies outside it"
    nonempty = sorted((i for i, c in enumerate(md.chunks) if math.prod(c.sizes) > 0), key=lambda i: tuple(md.chunks[i].offsets))
    for a, b in _overlapping_pairs(md.chunks, nonempty):
        ca, cb = md.chunks[a], md.chunks[b]
        return (
            f"{name}: chunk {list(ca.sizes)} at {list(ca.offsets)}{_by(ranks, a)} overlaps "
            f"chunk {list(cb.sizes)} at {list(cb.offsets)}{_by(ranks, b)}"
        )
    covered = sum(math.prod(c.sizes) for c in md.chunks)
    total = math.prod(size)
    if covered != total:
        missing = ""
        if ranks is not None and world_size:
            absent = sorted(set(range(world_size)) - set(ranks))
            missing = f"; no chunk from ranks {_ranges(absent)}" if absent else ""
        return f"{name}: chunks cover {covered} of {total} elements{missing}"
    return ""


def _overlapping_pairs(chunks: Sequence[ChunkStorageMetadata], order: list[int]) -> list[tuple[int, int]]:
    """The first overlapping pair, if any: a sweep over dim 0 (chunks sorted by offsets)."""
    active: list[int] = []
    for i in order:
        start = chunks[i].offsets[0] if chunks[i].offsets else 0
        active = [j for j in active if _end(chunks[j]) > start]
        for j in active:
            if _boxes_overlap(chunks[i], chunks[j]):
                return [(j, i)]
        active.append(i)
    return []


def _end(chunk: ChunkStorageMetadata) -> int:
    return chunk.offsets[0] + chunk.sizes[0] if chunk.offsets else 1


def _boxes_overlap(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> bool:
    return all(oa < ob + nb and ob < oa + na for oa, na, ob, nb in zip(a.offsets, a.sizes, b.offsets, b.sizes))


def _by(ranks: Sequence[int] | None, i: int) -> str:
    return f" (rank {ranks[i]})" if ranks is not None and i < len(ranks) else ""


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values[:_MAX_LISTED])) + (", ..." if len(values) > _MAX_LISTED else "")


def _check_ranks(ranks: list[int], world_size: int) -> None:
    if world_size < 1:
        raise InvalidRequest(f"world size {world_size} is not positive")
    seen: set[int] = set()
    for rank in ranks:
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank {rank} is outside 0..{world_size - 1}")
        if rank in seen:
            raise InvalidRequest(f"rank {rank} has two write results")
        seen.add(rank)
    missing = sorted(set(range(world_size)) - seen)
    if missing:
        raise InvalidRequest(f"ranks {_ranges(missing)} of {world_size} have not written their files")


def _check_same_key(state: dict[str, Any], paths: dict[str, tuple[PathItem, ...]], item: WrittenItem, where: str) -> None:
    if paths.setdefault(item.fqn, item.path) != item.path:
        raise InvalidRequest(f"{where} has path {list(item.path)}; another rank has {list(paths[item.fqn])}")
    md = state.get(item.fqn)
    if md is None:
        return
    if isinstance(md, BytesStorageMetadata) != (item.kind is ItemKind.BYTES):
        raise InvalidRequest(f"{where} is a {item.kind.value} item; a lower rank stored it as the other kind")
    if isinstance(md, TensorStorageMetadata):
        dtype = torch_dtype(item.dtype)
        if md.properties.dtype != dtype or tuple(md.size) != item.size:
            raise InvalidRequest(
                f"{where} is {item.dtype} {list(item.size)}; a lower rank wrote "
                f"{str(md.properties.dtype).removeprefix('torch.')} {list(md.size)}"
            )


def _add(state: dict[str, Any], storage: dict[MetadataIndex, _StorageInfo], item: WrittenItem) -> None:
    info = _StorageInfo(relative_path=item.file, offset=item.offset, length=item.length)
    if item.kind is ItemKind.BYTES:
        state[item.fqn] = BytesStorageMetadata()
        storage[MetadataIndex(item.fqn)] = info
        return
    md = state.setdefault(
        item.fqn,
        TensorStorageMetadata(properties=TensorProperties(dtype=torch_dtype(item.dtype)), size=torch.Size(item.size), chunks=[]),
    )
    storage[MetadataIndex(item.fqn, item.chunk_offsets, len(md.chunks))] = info
    md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(item.chunk_offsets), sizes=torch.Size(item.chunk_sizes)))


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(_int(v) for v in values)


def _item_to_json(item: WrittenItem) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "fqn": item.fqn,
        "path": list(item.path),
        "kind": item.kind.value,
        "file": item.file,
        "offset": item.offset,
        "length": item.length,
        "crc32c": item.crc32c,
    }
    if item.kind is not ItemKind.BYTES:
        raw |= {"dtype": item.dtype, "size": list(item.size), "chunk_offsets": list(item.chunk_offsets)}
        raw["chunk_sizes"] = list(item.chunk_sizes)
    return raw


def _item_from_json(raw: dict[str, Any]) -> WrittenItem:
    path = tuple(p if isinstance(p, int) and not isinstance(p, bool) else str(p) for p in raw["path"])
    kind = ItemKind(raw["kind"])
    tensor = kind is not ItemKind.BYTES
    return WrittenItem(
        fqn=str(raw["fqn"]),
        path=path,
        kind=kind,
        file=str(raw["file"]),
        offset=_int(raw["offset"]),
        length=_int(raw["length"]),
        crc32c=_int(raw["crc32c"]),
        dtype=str(raw["dtype"]) if tensor else "",
        size=_ints(raw["size"]) if tensor else (),
        chunk_offsets=_ints(raw["chunk_offsets"]) if tensor else (),
        chunk_sizes=_ints(raw["chunk_sizes"]) if tensor else (),
    )
