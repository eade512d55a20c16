"""Copies of tensor leaves into a slot, off the training thread.

CPU tensors are copied by one background thread (torch's copy releases the GIL and
uses the intra-op threads). CUDA tensors are copied on a side stream into slot memory
registered as pinned (cudaHostRegister), so the copy runs on the copy engine while the
next forward/backward runs; `CopyJob.fence()` makes the current stream wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from memckpt.agent.shm import Segment
from memckpt.faults import crash_point
from memckpt.trainer.layout import Layout


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
                self.view(p.offset, p.nbytes, dtype, s.shape)
                for p, s, dtype in zip(layout.placements, layout.specs, dtypes)
            ]
            self._views = (id(layout), views)
        return self._views[1]

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.bytes[offset:offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
        self._views = None
        del self.bytes
        self.segment.close()


class CopyJob:
    """One snapshot's copy. `copied` is set when the slot holds every byte; errors are kept."""

    def __init__(self) -> None:
        self.copied = threading.Event()
        self.error: BaseException | None = None
        self.copy_s = 0.0
        self.cuda_event: Any = None

    def fence(self) -> float:
        """Blocks until the source tensors may change again; returns the seconds waited."""
        start = time.perf_counter()
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)  # ordered on the GPU, no CPU wait
        self.copied.wait()
        return time.perf_counter() - start


class Copier:
    """Starts copies; at most one runs at a time (the caller fences the previous one first)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memckpt-copy")
        self._stream: Any = None

    def start(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], then: Callable[[CopyJob], None]) -> CopyJob:
        """Copies each (dst, src) pair, then calls `then(job)` on the copy thread."""
        job = CopyJob()
        cuda_pairs = [(d, s) for d, s in pairs if s.is_cuda]
        cpu_pairs = [(d, s) for d, s in pairs if not s.is_cuda]
        if cuda_pairs:
            job.cuda_event = self._start_cuda(cuda_pairs)
        self._executor.submit(self._run, job, cpu_pairs, then)
        return job

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _start_cuda(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)  # keep the source alive until the copy ran
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    @staticmethod
    def _run(job: CopyJob, pairs: list[tuple[torch.Tensor, torch.Tensor]], then: Callable[[CopyJob], None]) -> None:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for i, (dst, src) in enumerate(pairs):
                    dst.copy_(src)
                    if i == 0:
                        crash_point("trainer.copy.after_first")
            if job.cuda_event is not None:
                job.cuda_event.synchronize()
        except BaseException as exc:  # reported through the job, never raised on this thread
            job.error = exc
        finally:
            job.copy_s = time.perf_counter() - start
            job.copied.set()
        then(job)
