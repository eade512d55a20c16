"""A rank's exact snapshot read back from a complete DCP checkpoint memckpt wrote. File I/O.

Same world size only: for rank r it reads `__{r}.snapshot.json` (the snapshot's metadata)
and r's own items, so per-rank values that DCP keeps once (e.g. RNG states) come back as
rank r had them. Tensor bytes go straight from the file into the caller's buffer (a slot);
every item's crc32c is checked. To load into another world size, use stock `dcp.load`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import torch

from memckpt.agent.dcp import CHUNK_BYTES, is_complete, rank_result_name, snapshot_meta_name
from memckpt.agent.dcp_metadata import RankWriteResult, WrittenItem
from memckpt.agent.dcp_plan import PlannedObject, PlannedTensor, plan_items, torch_dtype
from memckpt.agent.torch_zip import tensor_envelope
from memckpt.errors import CorruptSnapshot, InvalidRequest, NotFound
from memckpt.trainer.tree import decode_meta

Place = Callable[[int, int], memoryview]  # (offset in the snapshot, nbytes) -> where those bytes go


def read_rank_snapshot(directory: Path, rank: int, buffer: memoryview | None = None, *, place: Place | None = None) -> bytes:
    """Fills `buffer` with rank `rank`'s snapshot bytes and returns its metadata.

    `place(offset, nbytes)`, instead of a buffer, says where the bytes at that offset of the
    snapshot go (one call per tensor, with its whole span): a restore reads straight into
    the tensors it fills.

    Raises:
        NotFound: the checkpoint is incomplete, or has no such rank.
        InvalidRequest: `buffer` is smaller than the snapshot.
        CorruptSnapshot: an item fails its crc32c, or the files disagree with each other.
    """
    if not is_complete(directory):
        raise NotFound(f"checkpoint {directory} is not complete")
    try:
        meta = (directory / snapshot_meta_name(rank)).read_bytes()
        result = RankWriteResult.from_json(json.loads((directory / rank_result_name(rank)).read_bytes()))
    except FileNotFoundError as exc:
        raise NotFound(f"checkpoint {directory} has no snapshot of rank {rank}") from exc
    tree = decode_meta(meta)
    if place is None:
        if buffer is None:
            raise InvalidRequest("read_rank_snapshot needs a buffer or a place function")
        if len(buffer) < tree["size_bytes"]:
            raise InvalidRequest(f"rank {rank}'s snapshot needs {tree['size_bytes']} bytes; the buffer has {len(buffer)}")
        whole = buffer
        place = lambda offset, nbytes: whole[offset : offset + nbytes]  # noqa: E731
    planned = plan_items(tree, tree["size_bytes"])
    if [p.fqn for p in planned] != [i.fqn for i in result.items]:
        raise CorruptSnapshot(f"checkpoint {directory}: rank {rank}'s snapshot metadata does not match its files")
    fd = os.open(directory / result.files[0].name, os.O_RDONLY | os.O_CLOEXEC) if result.files else -1
    try:
        if fd >= 0:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read front to back: a larger read-ahead
        for plan, item in zip(planned, result.items):
            if isinstance(plan, PlannedTensor):
                _read_tensor(fd, plan, item, place)
            else:
                _read_object(fd, plan, item, tree["tensors"], place)
    finally:
        if fd >= 0:
            os.close(fd)
    return meta


def _read_tensor(fd: int, plan: PlannedTensor, item: WrittenItem, place: Place) -> None:
    header = len(tensor_envelope(torch_dtype(plan.dtype), plan.chunk_sizes).header)
    if item.length < header + plan.nbytes:
        raise CorruptSnapshot(f"item {item.fqn!r} has {item.length} bytes; its tensor alone needs {plan.nbytes}")
    crc = int(crc32c.crc32c(os.pread(fd, header, item.offset)))
    target = place(plan.buffer_offset, plan.nbytes)
    for at in range(0, plan.nbytes, CHUNK_BYTES):
        chunk = target[at : at + CHUNK_BYTES]
        _read_exactly(fd, chunk, item.offset + header + at, item.fqn)
        crc = int(crc32c.crc32c(chunk, crc))
    trailer_at = item.offset + header + plan.nbytes
    crc = int(crc32c.crc32c(os.pread(fd, item.offset + item.length - trailer_at, trailer_at), crc))
    _check(item, crc)


def _read_object(fd: int, plan: PlannedObject, item: WrittenItem, table: list[dict[str, Any]], place: Place) -> None:
    data = os.pread(fd, item.length, item.offset)
    _check(item, int(crc32c.crc32c(data)))
    value = torch.load(io.BytesIO(data), weights_only=False)  # our own pickle, as stock DCP loads it
    _put(plan.node, value, table, place)


def _put(node: dict[str, Any], value: Any, table: list[dict[str, Any]], place: Place) -> None:
    """Writes the tensors and arrays inside a rebuilt value back to their places in the slot."""
    ((kind, body),) = node.items()
    if kind in ("tensor", "ndarray"):
        entry = table[body]
        tensor = torch.from_numpy(value) if kind == "ndarray" else value
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        place(entry["offset"], entry["nbytes"])[:] = raw.tobytes()
    elif kind == "dict":
        for key, child in body:
            _put(child, value[key], table, place)
    elif kind in ("list", "tuple"):
        for child, item in zip(body, value):
            _put(child, item, table, place)


def _read_exactly(fd: int, target: memoryview, offset: int, fqn: str) -> None:
    while target:
        done = os.preadv(fd, [target], offset)
        if done == 0:
            raise CorruptSnapshot(f"item {fqn!r} ends early: the file is shorter than its write result says")
        target, offset = target[done:], offset + done


def _check(item: WrittenItem, crc: int) -> None:
    if crc != item.crc32c:
        where = f"bytes {item.offset}..{item.offset + item.length} of {item.file}"
        raise CorruptSnapshot(f"key {item.fqn!r} ({where}) has crc32c {crc:08x}; {item.crc32c:08x} was written")
