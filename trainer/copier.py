"""Copies of tensor leaves into a slot, off the training thread.

CPU tensors are copied as raw byte spans by a few threads calling libc's memmove, which
uses non-temporal stores for large copies: on the 2-core machine of BASELINES.md this is
about 1.6x faster than `Tensor.copy_` (50 ms against 79 ms per GiB). CUDA tensors are copied on a side stream into slot memory
registered as pinned (cudaHostRegister), so the copy runs on the copy engine while the
next forward/backward runs; `CopyJob.fence()` makes the current stream wait for it. The copy
thread starts those copies too (one call per tensor: hundreds for a sharded model and its
optimizer, milliseconds the training thread would otherwise spend), after an event that the
training thread records, so they read the values of the moment `Copier.start` was called.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from memckpt.agent.shm import Segment
from memckpt.errors import InvalidRequest
from memckpt.faults import crash_point
from memckpt.trainer.layout import Layout

T = TypeVar("T")
Span = tuple[int, int, int]  # (destination address, source address, bytes)
MIN_SPLIT_BYTES = 4 << 20  # below this a span is not worth cutting across threads
DEFAULT_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))


def split_spans(spans: list[Span], parts: int, min_split_bytes: int = MIN_SPLIT_BYTES) -> list[list[Span]]:
    """Cuts spans into at most `parts` lists of about equal bytes, in order. Pure."""
    total = sum(n for _, _, n in spans)
    share = max(math.ceil(total / max(parts, 1)), min_split_bytes)
    result: list[list[Span]] = [[]]
    room = share
    for dst, src, nbytes in spans:
        while nbytes > 0:
            if room <= 0:
                result.append([])
                room = share
            piece = nbytes if nbytes - room < min_split_bytes // 4 else room
            result[-1].append((dst, src, piece))
            dst, src, nbytes, room = dst + piece, src + piece, nbytes - piece, room - piece
    return [part for part in result if part]


def _is_raw_copyable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    return (
        src.device.type == "cpu"
        and dst.device.type == "cpu"
        and src.dtype == dst.dtype
        and src.shape == dst.shape
        and src.is_contiguous()
        and dst.is_contiguous()
        and not src.is_conj()
        and not src.is_neg()
    )


def _memmove_all(spans: list[Span]) -> None:
    for dst, src, nbytes in spans:
        ctypes.memmove(dst, src, nbytes)  # releases the GIL


class ParallelCopy:
    """Copies many (dst, src) tensor pairs with `threads` threads; other pairs use `copy_`."""

    def __init__(self, threads: int = DEFAULT_COPY_THREADS) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=max(threads - 1, 1), thread_name_prefix="memckpt-memmove")

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        raw = [(d, s) for d, s in pairs if _is_raw_copyable(d, s)]
        spans = [(d.data_ptr(), s.data_ptr(), s.nbytes) for d, s in raw]
        parts = split_spans(spans, self.threads)
        futures = [self._pool.submit(_memmove_all, part) for part in parts[1:]]
        if parts:
            _memmove_all(parts[0])
        crash_point("trainer.copy.after_first")  # the slot now holds part of the new snapshot
        for future in futures:
            future.result()
        with torch.no_grad():
            for dst, src in pairs:
                if not _is_raw_copyable(dst, src):
                    dst.copy_(src)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class MappedSlot:
    """A slot segment seen as bytes by torch. Views alias the segment until `close()`."""

    def __init__(self, segment: Segment, pin: bool) -> None:
        self.segment = segment
        self.bytes = torch.frombuffer(segment.buffer, dtype=torch.uint8)
        self._pinned = False
        self._views: tuple[int, list[torch.Tensor]] | None = None
        if pin:
            result = torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), segment.size_bytes, 0)
            self._pinned = int(result) == 0

    def views(self, layout: Layout, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """Typed views of each leaf's range, cached for the layout last used."""
        if self._views is None or self._views[0] != id(layout):
            views = [
                self.view(p.offset, p.nbytes, dtype, s.shape) for p, s, dtype in zip(layout.placements, layout.specs, dtypes)
            ]
            self._views = (id(layout), views)
        return self._views[1]

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.bytes[offset : offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
        self._views = None
        del self.bytes
        self.segment.close()


class CopyJob:
    """One snapshot's copy; errors are kept, never raised on the copy thread.

    `cpu_copied` is set when the CPU tensors are in the slot; `copied` when every byte is
    (the CUDA copies too). Sources may change once `fence()` returned.
    """

    def __init__(self) -> None:
        self.cpu_copied = threading.Event()
        self.cuda_started = threading.Event()  # the GPU copies are queued (or failed to be)
        self.copied = threading.Event()
        self.error: BaseException | None = None
        self.copy_s = 0.0
        self.device: torch.device | None = None  # the CUDA sources' device
        self.cuda_ready: Any = None  # recorded on the training stream when the copy was asked for
        self.cuda_event: Any = None  # recorded on the side stream after the GPU copies

    def fence(self) -> float:
        """Orders later changes of the sources after the copy; returns the seconds the CPU waited.

        CUDA sources: the current stream waits for the copy's event on the GPU, so the CPU
        goes on queueing work (it waits only until the copy thread has queued the copies,
        long done by the next optimizer step). CPU sources: the CPU waits for the copy thread.
        """
        start = time.perf_counter()
        self.cuda_started.wait()
        if self.cuda_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.cuda_event)
        self.cpu_copied.wait()
        return time.perf_counter() - start


class Copier:
    """Starts copies; at most one runs at a time (the caller fences the previous one first)."""

    def __init__(self, threads: int = DEFAULT_COPY_THREADS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memckpt-copy")
        self._stream: Any = None
        self.parallel = ParallelCopy(threads)

    def start(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], then: Callable[[CopyJob], None]) -> CopyJob:
        """Copies each (dst, src) pair, then calls `then(job)` on the copy thread."""
        job = CopyJob()
        cuda_pairs = [(d, s) for d, s in pairs if s.is_cuda]
        cpu_pairs = [(d, s) for d, s in pairs if not s.is_cuda]
        device = None
        if cuda_pairs:
            device = cuda_pairs[0][1].device
            if any(s.device != device for _, s in cuda_pairs):
                raise InvalidRequest(
                    f"a snapshot's CUDA tensors must be on one device; found {sorted({str(s.device) for _, s in cuda_pairs})}"
                )
            job.device = device
            job.cuda_ready = torch.cuda.Event()
            job.cuda_ready.record(torch.cuda.current_stream(device))
        else:
            job.cuda_started.set()
        self._executor.submit(self._run, job, cuda_pairs, cpu_pairs, then)
        return job

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Runs `fn` on the copy thread (idle outside snapshots), e.g. to map a slot during an RPC."""
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.parallel.close()

    def _start_cuda(self, job: CopyJob, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Queues the GPU copies on the side stream, after `job.cuda_ready`; `job.cuda_event`
        follows them, also when queueing failed part way (the copies queued still write the slot:
        `_run` waits for them before the slot can be written again). No `record_stream`: `_run`
        holds the sources until the copies are done, so their memory cannot be reused meanwhile."""
        with torch.cuda.device(job.device):
            if self._stream is None or self._stream.device != job.device:
                self._stream = torch.cuda.Stream()
            self._stream.wait_event(job.cuda_ready)
            with torch.cuda.stream(self._stream):
                try:
                    for dst, src in pairs:
                        dst.copy_(src, non_blocking=True)
                finally:
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    job.cuda_event = event

    def _run(
        self,
        job: CopyJob,
        cuda_pairs: list[tuple[torch.Tensor, torch.Tensor]],
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        then: Callable[[CopyJob], None],
    ) -> None:
        start = time.perf_counter()
        try:
            try:
                if cuda_pairs:
                    self._start_cuda(job, cuda_pairs)
            finally:
                job.cuda_started.set()
            try:
                self.parallel.copy(pairs)
            finally:
                job.cpu_copied.set()
        except BaseException as exc:  # reported through the job, never raised on this thread
            job.error = exc
        finally:
            if job.cuda_event is not None:  # every byte in the slot before the commit (or the next write)
                try:
                    job.cuda_event.synchronize()
                except BaseException as exc:
                    job.error = job.error or exc
            job.copy_s = time.perf_counter() - start
            job.copied.set()
        then(job)
