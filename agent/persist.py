"""Lazy persistence: the snapshots of this agent's ranks, written to the shared filesystem.

One background thread at idle I/O priority, never on the trainer's path. Which steps: the
multiples of `--persist-every`, which every agent of the cluster picks alike without a word
(see `StepChooser`), or, for an agent alone, a step every `--persist-interval-s`. A commit of
a chosen step is kept (its slot is not recycled) until it is copied out: into a staging
buffer when the memory budget allows, so the slot is free again in a fraction of a second
and snapshots go on; else the files are written from the slot itself, and that rank's
snapshots skip meanwhile (counted by the trainer, training goes on).

A rank's files are written at `persist_rate` (a token bucket shared by all ranks of the
agent), fsynced, then a sidecar `__RANK.memckpt.json` says what they hold. The checkpoint
becomes visible when the global `.metadata` is written, last and atomically, once every
rank's sidecar is there: by the agent of rank 0 on the coordinator's word, or without a
coordinator by this agent when it holds all of them. Retention runs after each new complete
checkpoint. A failed write (a full disk, a vanished directory) is logged, shown in status,
its partial files removed; training and memory snapshots go on, and the next chosen step is
tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from memckpt.agent import checkpoints, dcp, metrics
from memckpt.agent.slots import Attempt, MemoryBudget, RankKey
from memckpt.agent.store import ProtectionWork, SlotStore
from memckpt.errors import BudgetExceeded, MemckptError
from memckpt.sizes import format_size

log = logging.getLogger(__name__)

NONE = -1

IDLE_S = 0.2


@dataclass(slots=True, kw_only=True)
class JobStatus:
    """What one job's persistence did, for status, metrics and logs."""

    complete_step: int = NONE  # the newest complete checkpoint this agent made or saw
    writing_step: int = NONE
    written_bytes: int = 0
    failures: int = 0
    last_error: str = ""
    last_write_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistPolicy:
    """Which steps are persisted: multiples of `every_steps`, or (one agent alone) the first
    commit after `interval_s` seconds; 0 turns a measure off."""

    every_steps: int = 0
    interval_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.interval_s > 0


@dataclass(slots=True)
class StepChooser:
    """Whether a commit is to be persisted, the same answer for every rank of a step.

    By steps the rule is arithmetic (multiples of `every_steps`), so agents across the
    cluster agree without talking, and a step one rank skipped costs one checkpoint, not
    the alignment. By time, the first commit of a step after `interval_s` decides for every
    rank this agent holds, which aligns them only when one agent holds the whole job.
    """

    policy: PersistPolicy
    clock: Callable[[], float] = time.monotonic
    _last: dict[tuple[str, int], float] = field(default_factory=dict)  # (job, generation) -> when one was chosen
    _answers: dict[tuple[str, int, int], bool] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wants(self, job: str, generation: int, step: int) -> bool:
        if self.policy.every_steps > 0 and step > 0 and step % self.policy.every_steps == 0:
            return True
        if self.policy.interval_s <= 0:
            return False
        with self._lock:
            answer = self._answers.get((job, generation, step))
            if answer is None:
                now = self.clock()
                last = self._last.setdefault((job, generation), now)
                answer = self._answers[(job, generation, step)] = now - last >= self.policy.interval_s
                if answer:
                    self._last[(job, generation)] = now
                if len(self._answers) > 4096:  # old answers: only the current steps are asked again
                    for key in list(self._answers)[:2048]:
                        del self._answers[key]
            return answer


class Persister:
    def __init__(
        self,
        *,
        store: SlotStore,
        budget: MemoryBudget,
        root: Path,
        rate: int,
        keep: int,
        keep_every: int,
        world_size: Callable[[str], int],
        finalize_here: Callable[[str], bool],
        chooser: StepChooser,
    ) -> None:
        """`world_size(job)`: ranks of the job; `finalize_here(job)`: whether this agent writes
        the job's checkpoints' metadata once every rank's sidecar is there (the agent of rank 0);
        `chooser`: which committed steps go to the filesystem (see `wants`)."""
        self._store = store
        self._budget = budget
        self._root = root
        # bursts of a quarter second: the rate holds for small snapshots too
        self._throttle = dcp.TokenBucket(rate, burst_bytes=max(64 << 10, min(dcp.CHUNK_BYTES, rate // 4))) if rate > 0 else None
        self._keep = keep
        self._keep_every = keep_every
        self._world_size = world_size
        self._finalize_here = finalize_here
        self._written: dict[tuple[str, int], set[int]] = {}  # (job, step) -> ranks written by this agent
        self.status: dict[str, JobStatus] = {}
        self._chooser = chooser
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persister", daemon=True)
        self._errors_logged: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)

    def wants(self, job: str, generation: int, step: int) -> bool:
        """The store asks this at each commit: whether to keep the slot for the filesystem. A
        kept slot blocks the rank's next snapshots until it is copied out, so the persister
        wakes at once to copy it."""
        wanted = self._chooser.wants(job, generation, step)
        if wanted:
            self._wake.set()
        return wanted

    def rank_died(self, key: RankKey, attempt: Attempt) -> None:
        """Persist at breakpoint: what this agent holds of a rank that died is written at once,
        unless a newer checkpoint is complete. Both of its snapshots go: ranks die a step apart,
        and the checkpoint is whole only where every rank wrote the same step."""
        newest = max((c.step for c in checkpoints.list_checkpoints(self._root, key.job) if c.complete), default=NONE)
        steps = self._store.keep_for_persist(key, attempt, newer_than=newest)
        if steps:
            log.info("%s died: persisting its steps %s now (newest complete checkpoint: %d)", key, steps, newest)

    def status_copy(self) -> dict[str, JobStatus]:
        return {job: replace(s) for job, s in list(self.status.items())}

    def written_steps(self) -> dict[tuple[str, int], set[int]]:
        """(job, step) -> ranks whose files this agent has written, for the coordinator's inventory."""
        return {k: set(v) for k, v in self._written.items()}

    def _progress(self, done: int, total: int) -> None:
        if self._stop.is_set():
            raise InterruptedError(f"agent stopping: {done} of {total} bytes written")

    def _loop(self) -> None:
        _lower_io_priority()
        while not self._stop.is_set():
            try:
                self._round()
            except Exception:  # a bug, or an error nobody foresaw: the persister must outlive it
                log.exception("persister round failed; persistence goes on with the next round")
                self._stop.wait(IDLE_S)

    def _round(self) -> None:
        """Copies out every slot waiting for the filesystem, writes them, finalizes what is whole.

        Every waiting slot is copied out before any file is written: a kept slot makes its rank
        skip snapshots, and ranks that skip different steps leave a step incomplete. Whatever
        happens, what was copied out or pinned is let go of.
        """
        self._wake.clear()
        pending: list[tuple[ProtectionWork, Attempt, memoryview, bool]] = []
        try:
            for work, attempt in self._store.persist_work():
                data, staged = self._copy_out(work)
                if data is not None:
                    pending.append((work, attempt, data, staged))
            waited = bool(pending)
            while pending:
                work, attempt, data, staged = pending.pop(0)
                if self._stop.is_set():
                    self._drop(work, data, staged)
                else:
                    self._persist(work, attempt, data, staged)
        finally:
            for work, _, data, staged in pending:
                self._drop(work, data, staged)
        self._finalize_ready()
        if not waited:
            self._wake.wait(IDLE_S)

    # -- one rank's files ------------------------------------------------------------

    def _persist(self, work: ProtectionWork, attempt: Attempt, data: memoryview, staged: bool) -> None:
        """Writes one rank's files from `data` (see `_copy_out`), then lets go of it."""
        job, rank, step = work.key.job, work.key.rank, work.step
        directory = checkpoints.step_dir(self._root, job, step)
        status = self.status.setdefault(job, JobStatus())
        if dcp.is_complete(directory) or rank in self._written.get((job, step), ()):
            # done already (by this agent before a restart), or asked twice (its rank died while
            # the step was kept anyway): a second write could truncate a file being finalized
            self._drop(work, data, staged)
            return
        status.writing_step = step
        started = time.perf_counter()
        try:
            try:
                checkpoints.claim(directory, f"{attempt.run_id}/{attempt.generation}")
                dcp.write_rank(directory, rank, data, work.meta, throttle=self._throttle, progress=self._progress)
            finally:
                self._drop(work, data, staged)
        except (OSError, MemckptError) as exc:
            self._failed(work, directory, exc)
            return
        finally:
            status.writing_step = NONE
        elapsed = time.perf_counter() - started
        metrics.PERSIST_SECONDS.labels(job).observe(elapsed)
        metrics.PERSIST_BYTES.labels(job).inc(work.size_bytes)
        status.written_bytes += work.size_bytes
        status.last_write_s = elapsed
        self._written.setdefault((job, step), set()).add(rank)
        log.info(
            "persisted %s step=%d bytes=%s s=%.3f (%.0f MB/s) dir=%s",
            work.key,
            step,
            format_size(work.size_bytes),
            elapsed,
            work.size_bytes / max(elapsed, 1e-9) / 1e6,
            directory,
        )

    def _copy_out(self, work: ProtectionWork) -> tuple[memoryview | None, bool]:
        """The commit's bytes: a staged copy (the slot is released at once) when the budget
        allows, else the pinned slot itself (released after the write). None: recycled."""
        view = self._store.pin(work)
        if view is None:
            self._store.release_persist(work)
            return None, False
        try:
            self._budget.reserve(_staging_owner(work), work.size_bytes, f"persist staging of {work.key}")
        except BudgetExceeded as exc:
            log.info("%s step=%d: written from its slot, snapshots of the rank skip meanwhile (%s)", work.key, work.step, exc)
            return view, False
        try:
            staged = memoryview(bytearray(work.size_bytes))
            staged[:] = view
        finally:
            view.release()
            self._store.unpin(work)
            self._store.release_persist(work)
        return staged, True

    def _drop(self, work: ProtectionWork, data: memoryview, staged: bool) -> None:
        """Lets go of what `_copy_out` returned: the staging memory, or the slot's pin."""
        if staged:
            self._budget.release(_staging_owner(work))
        else:
            data.release()
            self._store.unpin(work)
            self._store.release_persist(work)

    def _failed(self, work: ProtectionWork, directory: Path, exc: Exception) -> None:
        status = self.status.setdefault(work.key.job, JobStatus())
        status.failures += 1
        metrics.PERSIST_FAILURES.labels(work.key.job).inc()
        status.last_error = f"step {work.step} rank {work.key.rank}: {type(exc).__name__}: {exc}"
        kind = (work.key.job, type(exc).__name__)
        level = logging.WARNING if kind in self._errors_logged else logging.ERROR
        self._errors_logged.add(kind)
        log.log(level, "persisting %s step=%d to %s failed: %s; training goes on", work.key, work.step, directory, exc)
        self._store.release_persist(work)
        for name in (dcp.rank_file_name(work.key.rank), dcp.rank_result_name(work.key.rank)):
            try:
                (directory / name).unlink(missing_ok=True)
            except OSError as cleanup:  # e.g. the directory is not one (a file sits there)
                log.warning("cannot remove %s after the failed write: %s", directory / name, cleanup)

    # -- the whole checkpoint --------------------------------------------------------

    def _finalize_ready(self) -> None:
        for job, step in list(self._written):
            directory = checkpoints.step_dir(self._root, job, step)
            if dcp.is_complete(directory):
                self._complete(job, step)
                continue
            world = self._world_size(job)
            if world <= 0 or not all((directory / dcp.rank_result_name(r)).exists() for r in range(world)):
                continue
            if not self._finalize_here(job):
                continue
            try:
                dcp.finalize(directory, dcp.read_rank_results(directory, world), world_size=world)
            except (OSError, MemckptError) as exc:
                status = self.status.setdefault(job, JobStatus())
                status.failures += 1
                metrics.PERSIST_FAILURES.labels(job).inc()
                status.last_error = f"finalizing step {step}: {exc}"
                log.error("finalizing job=%s step=%d in %s failed: %s", job, step, directory, exc)
                del self._written[(job, step)]
                continue
            log.info("checkpoint complete job=%s step=%d ranks=%d dir=%s", job, step, world, directory)
            self._complete(job, step)

    def _complete(self, job: str, step: int) -> None:
        for key in [k for k in self._written if k[0] == job and k[1] <= step]:
            del self._written[key]  # older ones can no longer matter: retention removes them
        status = self.status.setdefault(job, JobStatus())
        status.complete_step = max(status.complete_step, step)
        found = checkpoints.list_checkpoints(self._root, job)
        for doomed in checkpoints.to_delete(found, keep=self._keep, keep_every=self._keep_every):
            checkpoints.remove(doomed)
            log.info("retention: removed job=%s step=%d (%s)", job, doomed.step, "complete" if doomed.complete else "incomplete")


def _staging_owner(work: ProtectionWork) -> str:
    return f"persist staging {work.key} step {work.step}"


def _lower_io_priority() -> None:
    """Idle I/O class for this thread: the training's own I/O goes first."""
    try:
        psutil.Process(threading.get_native_id()).ionice(psutil.IOPRIO_CLASS_IDLE)
    except (psutil.Error, OSError, AttributeError) as exc:
        log.info("cannot lower the persister's I/O priority: %s", exc)
