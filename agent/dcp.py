"""Snapshots written as `torch.distributed.checkpoint` (DCP) checkpoints that stock `dcp.load` reads.

Call order for one checkpoint directory: each rank's agent calls `write_rank` (in any order,
in parallel, on any machine that sees the directory); it writes `__{rank}_0.distcp` straight
from the snapshot buffer, then `__{rank}.snapshot.json` (the snapshot's metadata) and
`__{rank}.memckpt.json` (its `RankWriteResult`). Once every
rank has returned, one caller runs `finalize` with all the results, which writes the
checksums (`.memckpt.json`) and then the global `.metadata`, each atomically (temp, fsync,
rename). Until `.metadata` exists the directory is incomplete and nothing loads it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import crc32c
import torch

from memckpt.agent.dcp_metadata import (
    ItemKind,
    MergedCheckpoint,
    RankWriteResult,
    WrittenFile,
    WrittenItem,
    merge_results,
)
from memckpt.agent.dcp_plan import PlannedItem, PlannedObject, PlannedTensor, plan_items, rebuild_object, torch_dtype
from memckpt.agent.torch_zip import tensor_envelope
from memckpt.errors import CorruptSnapshot, InvalidRequest, NotFound
from memckpt.trainer.tree import decode_meta

log = logging.getLogger(__name__)

METADATA = ".metadata"  # DCP's global metadata; written last: its presence makes the checkpoint complete
CHECKSUMS = ".memckpt.json"  # every rank's RankWriteResult (files, items, crc32c); written just before METADATA
CHUNK_BYTES = 8 << 20  # one write (and one throttle/progress call) at a time

Progress = Callable[[int, int], None]  # (bytes written, bytes to write); may raise to abort the write


class Throttle(Protocol):
    """Paces a writer: `write_rank` calls `wait(n)` before each write of n bytes."""

    def wait(self, size_bytes: int) -> None: ...


class TokenBucket:
    """A Throttle of `rate_bytes_per_s` on average, in bursts of at most `burst_bytes`; thread-safe."""

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_bytes: int = CHUNK_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_bytes_per_s <= 0:
            raise InvalidRequest(f"rate {rate_bytes_per_s} bytes/s is not positive")
        self.rate_bytes_per_s = rate_bytes_per_s
        self.burst_bytes = burst_bytes
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst_bytes)
        self._last = clock()
        self._lock = threading.Lock()

    def wait(self, size_bytes: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._last) * self.rate_bytes_per_s) - size_bytes
            self._last = now
            debt_s = -self._tokens / self.rate_bytes_per_s
        if debt_s > 0:
            self._sleep(debt_s)


def rank_file_name(rank: int, index: int = 0) -> str:
    return f"__{rank}_{index}.distcp"


def rank_result_name(rank: int) -> str:
    return f"__{rank}.memckpt.json"


def snapshot_meta_name(rank: int) -> str:
    return f"__{rank}.snapshot.json"


def write_rank(
    directory: Path,
    rank: int,
    buffer: memoryview,
    meta: bytes,
    *,
    throttle: Throttle | None = None,
    progress: Progress | None = None,
    fsync: bool = True,
    zip_crc32: bool = False,
) -> RankWriteResult:
    """Writes one rank's snapshot (`buffer` + its tree metadata `meta`) as DCP files in `directory`.

    Tensor bytes are streamed from `buffer` in CHUNK_BYTES writes, never copied whole; the
    caller keeps `buffer` unchanged until this returns. Rewriting a rank truncates its files.

    Args:
        zip_crc32: also compute each tensor's zip CRC-32 (~2 GB/s a core), which torch.load does
            not check but other zip tools do; the crc32c of every item is always recorded.

    Returns:
        What `finalize` needs of this rank; also written to `__{rank}.memckpt.json`.

    Raises:
        InvalidRequest: bad metadata, or the checkpoint is already complete.
        OSError: the filesystem failed (e.g. ENOSPC); the directory stays incomplete.
    """
    if rank < 0:
        raise InvalidRequest(f"rank {rank} is negative")
    if is_complete(directory):
        raise InvalidRequest(f"checkpoint {directory} is already complete; rank {rank} cannot be rewritten")
    tree = decode_meta(meta)
    items = plan_items(tree, len(buffer))
    directory.mkdir(parents=True, exist_ok=True)
    name = rank_file_name(rank)
    writer = _RankFile(directory / name, buffer, throttle, progress, _total_bytes(items), zip_crc32)
    try:
        written = [writer.write(item, name, tree["tensors"]) for item in items]
        writer.finish(fsync)
    finally:
        writer.close()
    result = RankWriteResult(rank=rank, files=(WrittenFile(name=name, size_bytes=writer.position),), items=tuple(written))
    # the snapshot's own tree, so memckpt can restore this rank exactly (DCP keeps per-rank values once)
    _write_atomically(directory, snapshot_meta_name(rank), meta, fsync)
    _write_atomically(directory, rank_result_name(rank), json.dumps(result.to_json()).encode(), fsync)
    log.info("dcp rank written dir=%s rank=%d items=%d bytes=%d", directory, rank, len(written), writer.position)
    return result


def read_rank_results(directory: Path, world_size: int) -> list[RankWriteResult]:
    """The results ranks 0..world_size-1 left in `directory` (for a finalizer that shares the filesystem)."""
    missing = [r for r in range(world_size) if not (directory / rank_result_name(r)).is_file()]
    if missing:
        raise NotFound(f"checkpoint {directory}: ranks {missing} of {world_size} have not finished writing")
    results = []
    for rank in range(world_size):
        try:
            raw = json.loads((directory / rank_result_name(rank)).read_bytes())
        except ValueError as exc:
            raise CorruptSnapshot(f"checkpoint {directory}: {rank_result_name(rank)} is not JSON: {exc}") from exc
        results.append(RankWriteResult.from_json(raw))
    return results


def finalize(directory: Path, results: list[RankWriteResult], *, world_size: int, fsync: bool = True) -> MergedCheckpoint:
    """Makes the checkpoint complete: checks, then writes CHECKSUMS and METADATA last, atomically.

    Raises:
        InvalidRequest: ranks missing or repeated, chunks that do not tile a tensor, keys the
            ranks disagree on, or a checkpoint that is already complete.
        NotFound, CorruptSnapshot: a rank's file is gone, or not the size its result says.
    """
    if is_complete(directory):
        raise InvalidRequest(f"checkpoint {directory} is already complete")
    merged = merge_results(results, world_size=world_size, checkpoint_id=str(directory), save_id=str(uuid.uuid4()))
    for result in results:
        for f in result.files:
            _check_file_size(directory, result.rank, f)
    if merged.divergent:
        log.warning("dcp replicated keys differ between ranks; lowest rank kept dir=%s keys=%s", directory, merged.divergent)
    checksums = {"format": 1, "world_size": world_size, "ranks": [r.to_json() for r in sorted(results, key=lambda r: r.rank)]}
    _write_atomically(directory, CHECKSUMS, json.dumps(checksums).encode(), fsync)
    _write_atomically(directory, METADATA, pickle.dumps(merged.metadata), fsync)
    log.info(
        "dcp checkpoint complete dir=%s ranks=%d bytes=%d unreferenced_bytes=%d",
        directory,
        world_size,
        merged.referenced_bytes,
        merged.unreferenced_bytes,
    )
    return merged


def is_complete(directory: Path) -> bool:
    """Whether `.metadata` exists: it is written last, so the checkpoint is whole and loadable."""
    return (directory / METADATA).is_file()


class _RankFile:
    """One rank's data file being written: items back to back, a running crc32c per item."""

    def __init__(
        self,
        path: Path,
        buffer: memoryview,
        throttle: Throttle | None,
        progress: Progress | None,
        total_bytes: int,
        zip_crc32: bool,
    ) -> None:
        self.path = path
        self.buffer = buffer
        self.throttle = throttle
        self.progress = progress
        self.total_bytes = total_bytes
        self.zip_crc32 = zip_crc32
        self.position = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._checksummer = ThreadPoolExecutor(1, thread_name_prefix="dcp-crc")

    def write(self, item: PlannedItem, file_name: str, table: list[dict[str, Any]]) -> WrittenItem:
        start = self.position
        if isinstance(item, PlannedObject):
            crc = self._write(_saved_object(item, table, self.buffer), 0)
            return WrittenItem(
                fqn=item.fqn,
                path=item.path,
                kind=ItemKind.BYTES,
                file=file_name,
                offset=start,
                length=self.position - start,
                crc32c=crc,
            )
        envelope = tensor_envelope(torch_dtype(item.dtype), item.chunk_sizes)
        data = self.buffer[item.buffer_offset : item.buffer_offset + item.nbytes]
        zip_crc = _zip_crc32(data) if self.zip_crc32 else 0
        crc = self._write(envelope.header_for(zip_crc), 0)
        crc = self._write_checksummed_in_parallel(data, crc)
        crc = self._write(envelope.trailer(zip_crc), crc)
        return WrittenItem(
            fqn=item.fqn,
            path=item.path,
            kind=ItemKind.SHARD if item.sharded else ItemKind.TENSOR,
            file=file_name,
            offset=start,
            length=self.position - start,
            crc32c=crc,
            dtype=item.dtype,
            size=item.global_shape,
            chunk_offsets=item.chunk_offsets,
            chunk_sizes=item.chunk_sizes,
        )

    def _write(self, data: bytes | memoryview, crc: int) -> int:
        self._write_raw(memoryview(data).cast("B"))
        return int(crc32c.crc32c(data, crc))

    def _write_checksummed_in_parallel(self, data: memoryview, crc: int) -> int:
        """Writes `data` in chunks while a thread checksums each chunk (both release the GIL)."""
        for at in range(0, len(data), CHUNK_BYTES):
            chunk = data[at : at + CHUNK_BYTES]
            checksum = self._checksummer.submit(crc32c.crc32c, chunk, crc)
            try:
                self._write_raw(chunk)
            finally:
                crc = int(checksum.result())
        return crc

    def _write_raw(self, view: memoryview) -> None:
        size = len(view)
        if self.throttle is not None:
            self.throttle.wait(size)
        while view:
            view = view[os.write(self.fd, view) :]
        self.position += size
        if self.progress is not None:
            self.progress(self.position, self.total_bytes)

    def finish(self, fsync: bool) -> None:
        if fsync:
            os.fsync(self.fd)
            # written and durable: drop it from the page cache, where it would only push out training's pages
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._checksummer.shutdown()
        os.close(self.fd)


def _total_bytes(items: list[PlannedItem]) -> int:
    """Bytes of data to write (the tensors; headers and small values are not counted)."""
    return sum(i.nbytes for i in items if isinstance(i, PlannedTensor))


def _saved_object(item: PlannedObject, table: list[dict[str, Any]], buffer: memoryview) -> memoryview:
    out = io.BytesIO()
    torch.save(rebuild_object(item.node, table, buffer), out)
    return out.getbuffer()


def _zip_crc32(data: memoryview) -> int:
    crc = 0
    for at in range(0, len(data), CHUNK_BYTES):
        crc = zlib.crc32(data[at : at + CHUNK_BYTES], crc)
    return crc


def _check_file_size(directory: Path, rank: int, f: WrittenFile) -> None:
    try:
        size = (directory / f.name).stat().st_size
    except FileNotFoundError as exc:
        raise NotFound(f"checkpoint {directory}: rank {rank}'s file {f.name} is missing") from exc
    if size != f.size_bytes:
        raise CorruptSnapshot(f"checkpoint {directory}: rank {rank}'s file {f.name} is {size} bytes; it wrote {f.size_bytes}")


def _write_atomically(directory: Path, name: str, data: bytes, fsync: bool) -> None:
    """temp file ("xb"), write, fsync, rename over `name`, fsync the directory."""
    tmp = directory / f"{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp, directory / name)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
