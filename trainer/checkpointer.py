"""`Checkpointer`: the client API that a training loop calls to snapshot and restore its state.

Call order: `restore(state)` once at start (returns the step restored, or None), then
`snapshot(step, state)` after each optimizer step; `wait()` when the snapshot must be
committed; `close()` at the end. A snapshot failure never stops training unless `strict`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memckpt.agent.checkpoints import step_dir_in
from memckpt.agent.config import SHM_DIR_ENV, SOCKET_ENV, default_socket
from memckpt.agent.shm import DEFAULT_ROOT, ShmDir
from memckpt.agent.slots import Attempt
from memckpt.agent.store import RestoreSource, SlotGrant
from memckpt.errors import CorruptSnapshot, InvalidRequest, MemckptError, NotFound, Unavailable
from memckpt.names import check_name
from memckpt.trainer import metrics as trainer_metrics
from memckpt.trainer.client import AgentClient
from memckpt.trainer.copier import Copier, CopyJob, MappedSlot
from memckpt.trainer.direct import restore_direct
from memckpt.trainer.layout import Layout, compute_layout
from memckpt.trainer.recovery import StepChoice, choose_common_step
from memckpt.trainer.tree import Flat, decode_meta, encode_meta, fill, flatten

log = logging.getLogger(__name__)

BEGIN_RETRY_S = 0.05  # snapshot(wait_s=...): how often to ask again for a slot


def default_copy_threads() -> int:
    """This rank's share of the cores, at least 1 and at most 4."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(4, (os.cpu_count() or 1) // local_ranks))


def socket_for_rank(template: Path | str, rank: int) -> Path:
    """The agent socket of this rank: `{rank}` and `{local_rank}` in `template` filled in."""
    text = str(template)
    if "{" not in text:
        return Path(text)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        return Path(text.format(rank=rank, local_rank=local_rank))
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidRequest(f"socket path {text!r}: only {{rank}} and {{local_rank}} may be filled in ({exc})") from None


def _as_memckpt_error(exc: Exception, step: int) -> MemckptError:
    if isinstance(exc, MemckptError):
        return exc
    error = MemckptError(f"snapshot of step {step} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class SnapshotHandle:
    """One snapshot in flight or done. `error` is set when it failed; `stall_s` is what training waited."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.error: MemckptError | None = None
        self.stall_s = 0.0
        self.copy_s = 0.0
        self._job: CopyJob | None = None
        self._done = threading.Event()
        self._raised = False  # strict mode raises each failure once

    @property
    def committed(self) -> bool:
        return self._done.is_set() and self.error is None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    def _fail(self, error: MemckptError) -> None:
        self.error = error
        self._done.set()


@dataclass(slots=True, kw_only=True)
class CheckpointerStats:
    snapshots_committed: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    last_stall_s: float = 0.0
    total_stall_s: float = 0.0


class Checkpointer:
    """Snapshots one rank's training state into its node agent's memory.

    Args:
        job: the job's name (`[A-Za-z0-9._-]{1,64}`), shared by all its ranks.
        rank, world_size: default to torchrun's RANK and WORLD_SIZE.
        socket_path: the agent's socket; default MEMCKPT_SOCKET, else the agent's default.
            `{rank}` and `{local_rank}` in it are replaced by this rank's, so ranks on one
            machine can be spread over several agents (tests, demos: one agent per "node").
        strict: raise on snapshot failures instead of logging and counting them.
        generation, run_id: the job's attempt, so the agent refuses the snapshots of an earlier
            attempt's zombies; default: torchrun's TORCHELASTIC_RESTART_COUNT + 1 (1 outside
            torchrun) and TORCHELASTIC_RUN_ID (a requeued job's new run supersedes the old).
        metrics_listen: host:port where this rank serves Prometheus metrics (stall, copy,
            failures, restores), on port + LOCAL_RANK; default MEMCKPT_TRAINER_METRICS_LISTEN,
            else none.
        copy_threads: threads that copy CPU tensors into the slot; default: this rank's share
            of the cores (cores / LOCAL_WORLD_SIZE), so ranks' copies do not crowd each other.
    """

    def __init__(
        self,
        job: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        socket_path: Path | str | None = None,
        strict: bool = False,
        generation: int | None = None,
        run_id: str | None = None,
        copy_threads: int | None = None,
        metrics_listen: str | None = None,
    ) -> None:
        self.job = check_name(job, "job")
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.socket_path = socket_for_rank(socket_path or os.environ.get(SOCKET_ENV) or default_socket(), self.rank)
        self.strict = strict
        self.stats = CheckpointerStats()
        if generation is None:
            generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) + 1
        self.attempt = Attempt(
            run_id=os.environ.get("TORCHELASTIC_RUN_ID", "") if run_id is None else run_id, generation=generation
        )
        self._client = AgentClient(self.socket_path, self.job, self.rank, self.attempt)
        # the agent's shm_dir: ranks take it from the same MEMCKPT_SHM_DIR an agent reads
        self._shm = ShmDir(Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_ROOT))
        self._copier = Copier(copy_threads or default_copy_threads())
        self._slots: dict[str, MappedSlot] = {}
        self._slot_names: dict[int, str] = {}
        self._layout: Layout | None = None
        self._registered_bytes = 0
        self._inflight: SnapshotHandle | None = None
        self._warned: set[str] = set()
        self.restored_from = ""  # after a restore: "local", "fragments" (rebuilt from peers) or "filesystem"
        self.restored_step = -1
        self._labels = (self.job, str(self.rank))
        trainer_metrics.rank_seen(*self._labels)
        listen = trainer_metrics.listen_from_env() if metrics_listen is None else metrics_listen
        self.metrics_address = ""
        if listen:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            self.metrics_address = trainer_metrics.serve_for_rank(listen, local_rank).address

    # -- the API ---------------------------------------------------------------------

    def snapshot(self, step: int, state: dict[str, Any], *, wait_s: float = 0.0) -> SnapshotHandle:
        """Starts copying `state` into a slot and returns at once; the copy commits in the background.

        Tensors of `state` must not change until the copy is done: `attach_optimizer` makes
        `optimizer.step()` wait for it. Values that are not tensors are captured now.

        A snapshot is skipped (its handle says why) when the agent keeps both of the rank's
        slots, one for the job's protection or persistence still reading it, or cannot be
        reached. `wait_s` > 0 waits up to that long for a slot instead, stalling training: for
        a snapshot that must not be skipped, such as the last step of a run.
        """
        self._finish_previous()  # at most one snapshot in flight
        start = time.perf_counter()
        handle = SnapshotHandle(step)
        try:
            flat = flatten(state)
            layout = self._layout_for(flat)
            grant = self._begin(step, layout.size_bytes, wait_s)
            slot = self._map(grant.name, grant.index)
            views = slot.views(layout, [t.dtype for t in flat.tensors])
            # the metadata is wanted at the commit only: the copy thread encodes it, off the training thread
            commit = lambda job: self._commit(handle, grant, layout, flat, job)  # noqa: E731
            handle._job = self._copier.start(list(zip(views, flat.tensors)), commit)
        except Exception as exc:  # a snapshot failure never stops training (unless strict)
            self._record_failure(handle, _as_memckpt_error(exc, step))
        finally:
            self._inflight = handle
        handle.stall_s = time.perf_counter() - start
        trainer_metrics.STALL_SECONDS.labels(*self._labels).observe(handle.stall_s)
        self.stats.last_stall_s = handle.stall_s
        self.stats.total_stall_s += handle.stall_s
        return handle

    def wait(self, timeout_s: float | None = None) -> SnapshotHandle | None:
        """Waits until the snapshot in flight is committed (or failed); returns it."""
        handle = self._inflight
        if handle is not None:
            handle.wait(timeout_s)
            if self.strict and handle.error is not None and not handle._raised:
                handle._raised = True
                raise handle.error
        return handle

    def restore(self, state: dict[str, Any], *, coordinate: bool = True) -> int | None:
        """Fills `state` in place from a committed snapshot; returns its step, or None to start fresh.

        With torch.distributed initialized and `coordinate`, every rank calls this together:
        the ranks agree on the newest step that all of them hold, and all restore that one.
        Any failure (unreachable agent, corrupt bytes) raises: a job never silently starts over.

        Raises:
            CorruptSnapshot: the stored bytes fail their checksum (gRPC DATA_LOSS); not loaded.
            CorruptSnapshot: also when ranks hold snapshots but no step common to all of them
                (memory cannot restore the job; never a silent fresh start).
            Unavailable: the agent cannot be reached.
        """
        self.wait()
        listing = self._client.list_snapshots(self.world_size)
        choice = self._choose_step(listing.steps(), coordinate)
        if choice.lost:
            raise CorruptSnapshot(f"job {self.job!r} rank {self.rank}: {choice.reason}")
        if choice.step is None:
            log.info("restore job=%s rank=%d: %s", self.job, self.rank, choice.reason)
            return None
        if choice.step not in listing.memory:
            assert listing.persisted_dir is not None  # the step is persisted, then
            return self._restore_persisted(state, choice.step, listing.persisted_dir)
        held = listing.memory
        start = time.perf_counter()
        known = held[choice.step]  # "" when peers hold it: the agent rebuilds it, or we fetch it (direct)
        mapping = self._copier.submit(self._map, known) if known else None  # page tables while the agent verifies
        source = self._client.open_restore(choice.step, direct_ok=not known)
        if source.direct is not None:
            if self._restore_direct(state, source, start):
                return source.step
            source = self._client.open_restore(choice.step)  # the agent rebuilds it, from whichever holders can
        slot = mapping.result() if mapping is not None else None
        if slot is None or source.name != known:  # rebuilt, or the slot moved between the two calls
            slot = self._map(source.name)
        raw = decode_meta(source.meta)
        table = raw["tensors"]

        def stored(i: int) -> torch.Tensor:
            entry = table[i]
            if entry["offset"] + entry["nbytes"] > source.data_size_bytes:
                raise InvalidRequest(f"snapshot tensor {i} lies outside the slot's {source.data_size_bytes} bytes")
            dtype = getattr(torch, entry["dtype"])
            return slot.view(entry["offset"], entry["nbytes"], dtype, tuple(entry["shape"]))

        try:
            self._copier.parallel.copy(fill(state, raw["tree"], stored))
        finally:
            for name in {source.name, known} - set(self._slot_names.values()) - {""}:
                if name in self._slots:
                    self._slots.pop(name).close()  # fill copied everything out of it
        self.restored_from, self.restored_step = source.source, source.step
        self._count_restore(source.source, start)
        log.info(
            "restored job=%s rank=%d step=%d from=%s bytes=%d s=%.3f",
            self.job,
            self.rank,
            source.step,
            source.source,
            source.data_size_bytes,
            time.perf_counter() - start,
        )
        return source.step

    def _restore_direct(self, state: dict[str, Any], source: RestoreSource, start: float) -> bool:
        """Fetches a snapshot from the peers that hold it, into `state` (trainer/direct.py);
        False if a holder could not be reached or sent bytes that fail the owner's checksums."""
        plan = source.direct
        assert plan is not None
        try:
            size = restore_direct(state, plan, decode_meta(source.meta), self._copier.parallel.copy)
        except (CorruptSnapshot, Unavailable) as exc:
            what = f"job={self.job} rank={self.rank} step={plan.step}"
            log.warning("direct restore %s failed; the agent rebuilds it: %s", what, exc)
            return False
        self.restored_from, self.restored_step = source.source, plan.step
        self._count_restore(source.source, start)
        log.info(
            "restored job=%s rank=%d step=%d from=%s (direct from %s) bytes=%d s=%.3f",
            self.job,
            self.rank,
            plan.step,
            source.source,
            ", ".join(f.node for f in plan.fragments),
            size,
            time.perf_counter() - start,
        )
        return True

    def _restore_persisted(self, state: dict[str, Any], step: int, directory: Path) -> int:
        """Loads a complete persisted checkpoint (`trainer/persisted.py`): this rank's own bytes
        at the world size it was written with, else resharded by stock `dcp.load`. Each rank
        reads what it needs on its own: ranks that restore the same step from memory do not
        take part."""
        from memckpt.trainer.persisted import load_persisted  # memckpt.agent.dcp imports this package

        path = step_dir_in(directory, step)
        start = time.perf_counter()
        try:
            how = load_persisted(state, path, self.rank, self.world_size, copy=self._copier.parallel.copy)
        except Exception as exc:  # a damaged or vanished checkpoint: never a silent fresh start
            raise CorruptSnapshot(
                f"job {self.job!r} rank {self.rank}: cannot load persisted step {step} from {path}: {exc}"
            ) from exc
        self.restored_from, self.restored_step = "filesystem", step
        self._count_restore("filesystem", start)
        log.info(
            "restored job=%s rank=%d step=%d from=filesystem (%s) path=%s s=%.3f",
            self.job,
            self.rank,
            step,
            how,
            path,
            time.perf_counter() - start,
        )
        return step

    def _count_restore(self, source: str, started: float) -> None:
        trainer_metrics.RESTORES.labels(*self._labels, source).inc()
        trainer_metrics.RESTORE_SECONDS.labels(*self._labels, source).observe(time.perf_counter() - started)

    def _choose_step(self, held: list[int], coordinate: bool) -> StepChoice:
        if coordinate and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[list[int]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(everyone, held)
            return choose_common_step(everyone)
        return choose_common_step([held])

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Makes `optimizer.step()` wait for the snapshot copy before it changes parameters."""
        optimizer.register_step_pre_hook(lambda *_: self.fence())

    def close(self) -> None:
        """Waits for the snapshot in flight (its error, if any, was already reported), then frees all."""
        if self._inflight is not None:
            self._inflight.wait()
        self._copier.close()
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        self._client.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def fence(self) -> None:
        """Returns once the sources of the snapshot in flight may change (what the optimizer pre-hook does).

        On the CPU it waits for the copy; with CUDA sources it orders the current stream after
        the copy instead. The wait counts as that snapshot's stall.
        """
        handle = self._inflight
        if handle is None or handle._job is None:
            return
        waited = handle._job.fence()
        handle.stall_s += waited
        self.stats.last_stall_s = handle.stall_s
        self.stats.total_stall_s += waited

    def _finish_previous(self) -> None:
        self.fence()
        start = time.perf_counter()
        self.wait()
        if self._inflight is not None:
            waited = time.perf_counter() - start
            self._inflight.stall_s += waited
            self.stats.total_stall_s += waited

    def _layout_for(self, flat: Flat) -> Layout:
        if self._layout is None or self._layout.specs != flat.specs:
            self._layout = compute_layout(flat.specs)
            log.info("layout job=%s rank=%d tensors=%d bytes=%d", self.job, self.rank, len(flat.specs), self._layout.size_bytes)
        return self._layout

    def _begin(self, step: int, size_bytes: int, wait_s: float) -> SlotGrant:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._begin_once(step, size_bytes)
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(BEGIN_RETRY_S)

    def _begin_once(self, step: int, size_bytes: int) -> SlotGrant:
        if size_bytes > self._registered_bytes:
            self._client.register(self.world_size, size_bytes)
            self._registered_bytes = size_bytes
        # (again, after an agent restart) so the agent hears if this process dies
        self._client.attach(self.restored_from, self.restored_step)
        try:
            return self._client.begin(step, size_bytes)
        except NotFound:  # a fresh agent that never saw this rank: register again
            self._client.register(self.world_size, size_bytes)
            return self._client.begin(step, size_bytes)

    def _map(self, name: str, index: int | None = None) -> MappedSlot:
        """The mapping of slot `name`; a write grant for `index` replaces that index's old mapping."""
        slot = self._slots.get(name)
        if slot is not None and not self._shm.is_same_segment(slot.segment):
            self._slots.pop(name).close()  # a fresh agent recreated it: our mapping is of a dead file
            slot = None
        if slot is None:
            slot = MappedSlot(self._shm.open_segment(name), pin=torch.cuda.is_available())
            self._slots[name] = slot
        if index is not None:
            old = self._slot_names.get(index)
            if old is not None and old != name:
                self._slots.pop(old).close()  # the agent reallocated that slot
            self._slot_names[index] = name
        return slot

    def _commit(self, handle: SnapshotHandle, grant: SlotGrant, layout: Layout, flat: Flat, job: CopyJob) -> None:
        handle.copy_s = job.copy_s
        try:
            if job.error is not None:
                raise MemckptError(f"copy of step {handle.step} failed: {job.error!r}")
            meta = encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes, self.world_size)
            self._client.commit(handle.step, grant.index, layout.size_bytes, meta)
            self.stats.snapshots_committed += 1
            trainer_metrics.COMMITTED.labels(*self._labels).inc()
            trainer_metrics.COPY_SECONDS.labels(*self._labels).observe(job.copy_s)
            handle._done.set()
        except Exception as exc:  # on the copy thread: whatever happens, the handle must complete
            self._record_failure(handle, _as_memckpt_error(exc, handle.step), raise_strict=False)

    def _record_failure(self, handle: SnapshotHandle, exc: MemckptError, raise_strict: bool = True) -> None:
        kind = type(exc).__name__
        self.stats.failures[kind] += 1
        trainer_metrics.FAILURES.labels(*self._labels, kind).inc()
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "snapshot job=%s rank=%d step=%d failed (%s); training goes on: %s", self.job, self.rank, handle.step, kind, exc
            )
        handle._fail(exc)
        if self.strict and raise_strict:
            handle._raised = True
            raise exc
