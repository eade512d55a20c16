"""A direct restore: a snapshot that the rank's agent does not hold, fetched by the trainer
itself from the peers that hold its data fragments, straight into the state's tensors.

The agent's other way, a rebuild into a slot of its own that the trainer then copies from,
costs a slot of fresh memory (on a new node every page of it is a first touch) and a second
copy of every byte. Here the agent only gets a one-time ticket on each holder's bulk channel
(`OpenRestoreResponse.direct`); the trainer connects to each holder, sends the ticket, and
receives data fragment i, which is the snapshot's bytes [i * F, (i + 1) * F), into the live
tensors those bytes belong to, with `recv_into`: one copy, from the socket into the tensor.
Bytes that have no live tensor to go to (tensors the state lacks, numpy arrays, tensors on a
GPU or laid out otherwise) go into a scratch buffer, and the padding between tensors and past
the end into a small buffer that is overwritten. Every byte is checksummed as it arrives, and
the sums are checked against the owner's (crc32c per 64 MiB of the snapshot, then of its
metadata) before the restore counts: a mismatch raises CorruptSnapshot, and the caller asks
the agent to rebuild the snapshot instead (which overwrites every tensor again).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c
import torch

from memckpt.agent import bulk
from memckpt.agent.checksum import CHUNK_BYTES, chunk_count, combine_crc32c
from memckpt.agent.store import DirectPlan
from memckpt.errors import CorruptSnapshot, InvalidRequest, Unavailable
from memckpt.trainer.tree import Pairs, fill, live_tensors

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # received (and checksummed) per call: stays in the cache between the two
CONNECT_TIMEOUT_S = 5.0  # a holder that cannot be reached: the agent rebuilds from others instead
IO_TIMEOUT_S = 30.0

DIRECT, KEPT, DROPPED = "direct", "kept", "dropped"


@dataclass(frozen=True, slots=True)
class Span:
    """Snapshot bytes [start, end): into stored tensor `tensor`'s live tensor (DIRECT), into the
    scratch buffer at the same offset (KEPT), or checksummed and dropped (DROPPED: padding)."""

    start: int
    end: int
    kind: str
    tensor: int = -1


def layout_spans(data_size_bytes: int, table: list[dict[str, Any]], direct: set[int]) -> list[Span]:
    """Spans covering [0, data_size_bytes) in order: each stored tensor's bytes DIRECT (for those
    in `direct`) or KEPT, and what lies between them DROPPED. Raises InvalidRequest for a table
    whose tensors overlap or lie outside the data. Pure."""
    spans: list[Span] = []
    at = 0
    for index, entry in sorted(enumerate(table), key=lambda item: (int(item[1]["offset"]), item[0])):
        start, nbytes = int(entry["offset"]), int(entry["nbytes"])
        if nbytes == 0:
            continue
        if start < at or start + nbytes > data_size_bytes:
            raise InvalidRequest(f"snapshot tensor {index} at bytes {start}..{start + nbytes} overlaps another or the end")
        if start > at:
            spans.append(Span(at, start, DROPPED))
        spans.append(Span(start, start + nbytes, DIRECT if index in direct else KEPT, index))
        at = start + nbytes
    if at < data_size_bytes:
        spans.append(Span(at, data_size_bytes, DROPPED))
    return spans


def pieces(
    start: int, end: int, data_size_bytes: int, spans: list[Span], piece_bytes: int = PIECE_BYTES
) -> Iterator[tuple[int, int, Span | None]]:
    """[start, end) of the snapshot cut where a span or a checksum chunk ends and at
    `piece_bytes`: (start, end, its span; None past the data: a fragment's zero padding). Pure."""
    starts = [s.start for s in spans]
    at = start
    while at < end:
        if at >= data_size_bytes:
            yield at, min(end, at + piece_bytes), None
            at = min(end, at + piece_bytes)
            continue
        span = spans[bisect.bisect_right(starts, at) - 1]
        stop = min(end, span.end, at + piece_bytes, (at // CHUNK_BYTES + 1) * CHUNK_BYTES)
        yield at, stop, span
        at = stop


@dataclass(slots=True)
class _Run:
    """A contiguous run of received bytes inside one checksum chunk, and their crc32c."""

    chunk: int
    start: int
    length: int
    crc: int


class Checksums:
    """crc32c of each checksum chunk, from runs received by several threads in any order. Thread-safe."""

    def __init__(self, data_size_bytes: int) -> None:
        self._data_size_bytes = data_size_bytes
        self._runs: list[_Run] = []
        self._lock = threading.Lock()

    def add(self, run: _Run) -> None:
        with self._lock:
            self._runs.append(run)

    def sums(self) -> tuple[int, ...]:
        """The chunks' crc32c; raises CorruptSnapshot if some bytes were not received. Pure."""
        by_chunk: dict[int, list[_Run]] = {}
        for run in self._runs:
            by_chunk.setdefault(run.chunk, []).append(run)
        result = []
        for chunk in range(chunk_count(self._data_size_bytes)):
            at, end, crc = chunk * CHUNK_BYTES, min((chunk + 1) * CHUNK_BYTES, self._data_size_bytes), 0
            for run in sorted(by_chunk.get(chunk, []), key=lambda r: r.start):
                if run.start != at:
                    break
                crc = combine_crc32c(crc, run.crc, run.length) if at > chunk * CHUNK_BYTES else run.crc
                at += run.length
            if at != end:
                raise CorruptSnapshot(f"snapshot bytes {at}..{end} were not received")
            result.append(crc)
        return tuple(result)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (the tensor must outlive it)."""
    return memoryview((ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


def _receivable(live: torch.Tensor, entry: dict[str, Any]) -> bool:
    return (
        live.device.type == "cpu"
        and str(live.dtype).removeprefix("torch.") == entry["dtype"]
        and list(live.shape) == list(entry["shape"])
        and live.is_contiguous()
        and not live.is_conj()
        and not live.is_neg()
        and live.nbytes == int(entry["nbytes"])
    )


class _Destinations:
    """Where each span's bytes go: views of the live tensors, of a scratch buffer, of a drop buffer."""

    def __init__(self, spans: list[Span], targets: dict[int, torch.Tensor], data_size_bytes: int) -> None:
        self._views = {s.tensor: _bytes_of(targets[s.tensor]) for s in spans if s.kind == DIRECT}
        kept = any(s.kind == KEPT for s in spans)
        # untouched until written: only the pages of kept tensors are ever faulted in
        self.scratch = torch.empty(data_size_bytes if kept else 0, dtype=torch.uint8)
        self._scratch = _bytes_of(self.scratch) if kept else memoryview(bytearray())

    def view(self, start: int, end: int, span: Span | None, drop: memoryview) -> memoryview:
        if span is None or span.kind == DROPPED:
            return drop[: end - start]
        if span.kind == KEPT:
            return self._scratch[start:end]
        return self._views[span.tensor][start - span.start : end - span.start]


def restore_direct(state: dict[str, Any], plan: DirectPlan, raw: dict[str, Any], copy: Callable[[Pairs], None]) -> int:
    """Fetches the plan's fragments into `state` (see the module's doc); returns the bytes received.

    Raises CorruptSnapshot (checksums, sizes), Unavailable (a holder unreachable or cut off)
    or InvalidRequest (the state cannot take the snapshot, as `fill` says). On any error part
    of the state may have been written.
    """
    table = raw["tensors"]
    size = plan.data_size_bytes
    if len(plan.checksums) != chunk_count(size) + 1 or int(crc32c.crc32c(plan.meta)) != plan.checksums[-1]:
        raise CorruptSnapshot(f"step {plan.step}: the metadata does not match the owner's checksums")
    indices = sorted(f.index for f in plan.fragments)
    if indices != list(range(len(indices))) or len(indices) * plan.fragment_bytes < size:
        raise CorruptSnapshot(f"step {plan.step}: data fragments {indices} of {plan.fragment_bytes} bytes do not cover {size}")
    live = live_tensors(state, raw["tree"])
    targets = {i: t for i, t in live.items() if 0 <= i < len(table) and _receivable(t, table[i])}
    spans = layout_spans(size, table, set(targets))
    destinations = _Destinations(spans, targets, size)
    checksums = Checksums(size)

    def receive(index: int) -> None:
        fragment = next(f for f in plan.fragments if f.index == index)
        what = f"fragment {index} of step {plan.step} from {fragment.node} ({fragment.host}:{fragment.port})"
        try:
            conn = bulk.connect(fragment.host, fragment.port, fragment.ticket, CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise Unavailable(f"{what}: cannot connect ({exc})") from None
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            _receive_fragment(conn, index * plan.fragment_bytes, plan.fragment_bytes, what)

    def _receive_fragment(conn: socket.socket, base: int, length: int, what: str) -> None:
        """The fragment's bytes to their places, each checksummed right after it arrives (still
        in the cache); a run of them inside one checksum chunk has one running crc32c. The
        padding past the data is not checked: it is dropped, and the owner's sums cover the rest."""
        drop = memoryview(bytearray(PIECE_BYTES))
        run: _Run | None = None
        for start, end, span in pieces(base, base + length, size, spans):
            view = destinations.view(start, end, span, drop)
            chunk = start // CHUNK_BYTES
            if span is not None and (run is None or run.chunk != chunk):
                if run is not None:
                    checksums.add(run)
                run = _Run(chunk=chunk, start=start, length=0, crc=0)
            try:
                got = 0
                while got < len(view):
                    received = conn.recv_into(view[got:])
                    if received == 0:
                        raise ConnectionError("the holder closed the connection early")
                    if run is not None and span is not None:
                        run.crc = int(crc32c.crc32c(view[got : got + received], run.crc))
                    got += received
            except OSError as exc:
                raise Unavailable(f"{what}: the connection broke at byte {start - base} of {length} ({exc})") from None
            if run is not None and span is not None:
                run.length += end - start
        if run is not None:
            checksums.add(run)

    with ThreadPoolExecutor(max_workers=len(indices), thread_name_prefix="direct-restore") as pool:
        for future in [pool.submit(receive, i) for i in indices]:
            future.result()
    found = checksums.sums()
    expected = plan.checksums[:-1]
    if found != expected:
        bad = [i for i, (f, e) in enumerate(zip(found, expected)) if f != e]
        raise CorruptSnapshot(f"step {plan.step}: bytes of checksum chunks {bad} do not match the owner's checksums")

    def stored(i: int) -> torch.Tensor:
        if i in targets:
            return targets[i]  # already in place: `fill` pairs it with itself
        entry = table[i]
        start, nbytes = int(entry["offset"]), int(entry["nbytes"])
        if start + nbytes > size:
            raise InvalidRequest(f"snapshot tensor {i} lies outside the snapshot's {size} bytes")
        data = destinations.scratch[start : start + nbytes]
        return data.view(getattr(torch, entry["dtype"])).reshape(tuple(entry["shape"]))

    pairs = fill(state, raw["tree"], stored)
    copy([(dst, src) for dst, src in pairs if dst.data_ptr() != src.data_ptr() or dst.device != src.device])
    return size
