"""The agent's slot store: the slot state machine bound to shared memory and manifests.

Thread-safe. The trainer never waits on a checksum: commits queue the slot for the
background checksummer, and a restore verifies the stored checksum before handing
the slot out. A checksum computed over a slot that moved on meanwhile is dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from memckpt.agent.checksum import chunk_checksums, describe_mismatch
from memckpt.agent.manifest import decode_manifest, encode_manifest
from memckpt.agent.shm import Segment, SegmentWriter, ShmDir
from memckpt.agent.slots import Attempt, MemoryBudget, RankKey, RankSlots, Slot, SlotState, admit_attempt, new_rank_slots
from memckpt.coordinator.cluster import Held
from memckpt.errors import CorruptSnapshot, InvalidRequest, MemckptError, NotFound
from memckpt.names import check_name
from memckpt.sizes import format_size

log = logging.getLogger(__name__)

VERIFY_THREADS = 2
_FIRST = Attempt()
MAX_WORLD_SIZE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotGrant:
    index: int
    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectionWork:
    """One commit to encode and send to the group."""

    key: RankKey
    index: int
    commit_id: int
    step: int
    size_bytes: int
    meta: bytes
    generation: int
    checksums: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreSource:
    step: int
    name: str
    size_bytes: int
    data_size_bytes: int
    meta: bytes
    checksums: tuple[int, ...]
    source: str = "local"  # or "fragments": rebuilt from peers for this restore
    direct: DirectPlan | None = None  # set: the caller fetches the bytes from peers itself (no slot)


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectFragment:
    index: int
    node: str
    host: str
    port: int
    ticket: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectPlan:
    """A snapshot a trainer fetches itself: data fragment i is the snapshot's bytes
    [i * fragment_bytes, (i + 1) * fragment_bytes), checked against the owner's `checksums`."""

    step: int
    data_size_bytes: int
    fragment_bytes: int
    meta: bytes
    checksums: tuple[int, ...]
    fragments: tuple[DirectFragment, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallTarget:
    """A slot begun for a snapshot rebuilt from peers' fragments (see `SlotStore.begin_install`).

    `writer` writes into the slot through its file (fetched fragments); `buffer` is the agent's
    mapping of the same memory (a decode reads and writes there). Both alias the slot, which
    nobody else writes while it is being rebuilt, until `commit_install` or `abort_install`.
    """

    key: RankKey
    step: int
    index: int
    writer: SegmentWriter
    buffer: memoryview
    created: bool  # the rank was registered for this rebuild: an abort drops it whole


class SlotStore:
    """Slots of every (job, rank) this agent serves, within one memory budget."""

    def __init__(self, *, shm: ShmDir, prefix: str, budget: MemoryBudget) -> None:
        self._shm = shm
        self._prefix = prefix
        self._budget = budget
        self._lock = threading.Lock()
        # (job, generation) -> the step the coordinator aligns the job's ranks on; set by the daemon
        self.protection_target: Callable[[str, int], int | None] = lambda job, generation: None
        # (job, generation, step) -> whether that commit is to be persisted; set by the daemon
        self.persist_wanted: Callable[[str, int, int], bool] = lambda job, generation, step: False
        self._ranks: dict[RankKey, RankSlots] = {}
        self._attempts: dict[str, Attempt] = {}  # each job's current attempt
        self._segments: dict[tuple[RankKey, int], Segment] = {}
        self._pending: queue.Queue[tuple[RankKey, int, int] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._verifier = ThreadPoolExecutor(max_workers=VERIFY_THREADS, thread_name_prefix="verify")
        self._prefaulter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefault")

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._checksum_loop, name="checksum", daemon=True)
        self._worker.start()

    def stop(self, remove: bool, timeout_s: float = 10.0) -> None:
        """Stops the checksummer and unmaps; with `remove`, unlinks every segment and manifest."""
        self._pending.put(None)
        if self._worker is not None:
            self._worker.join(timeout=timeout_s)
        self._verifier.shutdown(wait=True)
        self._prefaulter.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for key in list(self._ranks):
                self._drop_rank(key, unlink=remove)

    def adopt(self) -> int:
        """Re-adopts the slots named by manifests left in shm by an earlier agent; returns ranks adopted."""
        adopted = 0
        for name in self._shm.list_names(self._prefix):
            if name.endswith(".manifest"):
                try:
                    adopted += self._adopt_manifest(name)
                except MemckptError as exc:  # e.g. shm too full to recreate a slot: serve the rest
                    log.error("cannot adopt manifest name=%s: %s", name, exc)
        keep = {self._manifest_name(k) for k in self._ranks}
        keep |= {self._slot_name(k, s) for k, r in self._ranks.items() for s in r.slots}
        for name in self._shm.list_names(self._prefix):
            if name not in keep:
                log.info("removing orphan shm segment name=%s", name)
                self._shm.unlink(name)
        return adopted

    # -- the RPCs ------------------------------------------------------------------

    def register(
        self, job: str, rank: int, world_size: int, slot_size_bytes: int, attempt: Attempt = _FIRST, *, allocate: bool = True
    ) -> RankSlots:
        """Registers the rank (again); `allocate=False` leaves a new rank's slots without memory
        until begun (a rebuild from peers fills one slot; the other waits for the rank's client)."""
        key = self._key(job, rank)
        if not 0 < world_size <= MAX_WORLD_SIZE or rank >= world_size:
            raise InvalidRequest(f"{key}: world size {world_size} is invalid for this rank")
        if slot_size_bytes <= 0:
            raise InvalidRequest(f"{key}: slot size must be positive, got {slot_size_bytes}")
        with self._lock:
            job_attempt = self._admit(key, attempt, registering=True)
            slots = self._ranks.get(key)
            held = slots.reserved_bytes() if slots else 0
            self._budget.reserve(str(key), max(held, 2 * slot_size_bytes), f"{key} (2 slots of {format_size(slot_size_bytes)})")
            if slots is None:
                slots = new_rank_slots(key, world_size, slot_size_bytes)
                self._ranks[key] = slots
                try:
                    for slot in slots.slots if allocate else ():
                        self._map_new(key, slot)
                except MemckptError:
                    self._drop_rank(key, unlink=True)
                    raise
            else:
                for index in slots.abandon_writes():
                    self._replace_segment(key, slots.slots[index])
                for slot in slots.slots if allocate else ():
                    if (key, slot.index) not in self._segments:  # left without memory by a rebuild
                        self._map_new(key, slot)
                slots.world_size = world_size
            slots.attempt = attempt
            self._attempts[job] = job_attempt
            self._write_manifest(slots)
            log.info("registered %s world_size=%d slot=%s attempt=%s", key, world_size, format_size(slot_size_bytes), attempt)
            return slots

    def begin(
        self, job: str, rank: int, step: int, size_bytes: int, attempt: Attempt = _FIRST, *, prefault: bool = True
    ) -> SlotGrant:
        key = self._key(job, rank)
        with self._lock:
            self._attempts[job] = self._admit(key, attempt, registering=False)
            slots = self._rank(key)
            if step < 0:
                raise InvalidRequest(f"{key}: step must be >= 0, got {step}")
            # the target may have moved on while the replicator rests: its old step is not kept any longer
            slots.release_reservations(self.protection_target(job, slots.attempt.generation))
            slots.check_begin(step)  # refused requests must not reserve memory
            self._budget.reserve(
                str(key), self._grown_total(slots, size_bytes), f"{key} step {step} needs {format_size(size_bytes)}"
            )
            slot, grow = slots.begin(step, size_bytes)
            if grow:
                old_name = self._slot_name(key, replace(slot, version=slot.version - 1))
                self._unmap(key, slot.index, old_name, unlink=True)
            if (key, slot.index) not in self._segments:  # grown, or an earlier allocation failed
                self._map_new(key, slot, prefault)
            # The slot is WRITING on record before its bytes change: an agent killed meanwhile and
            # started again must not adopt it as the committed step it held (nor checksum torn bytes).
            self._write_manifest(slots)
            return SlotGrant(index=slot.index, name=self._slot_name(key, slot), size_bytes=slot.size_bytes)

    def commit(
        self, job: str, rank: int, step: int, index: int, data_size_bytes: int, meta: bytes, attempt: Attempt = _FIRST
    ) -> Slot:
        key = self._key(job, rank)
        try:
            meta.decode()
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{key} step {step}: snapshot metadata is not UTF-8 JSON ({exc})") from None
        with self._lock:
            self._attempts[job] = self._admit(key, attempt, registering=False)
            slots = self._rank(key)
            slot = slots.commit(index, step, data_size_bytes, meta)
            if self.protection_target(job, slots.attempt.generation) == step:
                slots.reserved.add(index)  # the step the job's ranks protect: not recycled before it is sent
            if self.persist_wanted(job, slots.attempt.generation, step):
                slots.to_persist.add(index)  # not recycled before it is copied out to the filesystem
            self._write_manifest(slots)
        self._pending.put((key, index, slot.commit_id))
        log.debug("commit %s step=%d slot=%d bytes=%d", key, step, index, data_size_bytes)
        return slot

    def list_steps(self, job: str, rank: int) -> list[tuple[int, str]]:
        """(step, slot name) of each committed snapshot of the rank, newest first."""
        return [(step, name) for step, name, _ in self.list_snapshots(job, rank)]

    def list_snapshots(self, job: str, rank: int) -> list[tuple[int, str, int]]:
        """(step, slot name, the job's world size then, 0 if unknown) of each committed snapshot, newest first."""
        key = self._key(job, rank)
        with self._lock:
            slots = self._rank(key)
            found = [slots.committed_at(step) for step in slots.committed_steps()]
            return [(s.step, self._slot_name(key, s), _world_size_of(s.meta)) for s in found if s is not None]

    def open_restore(self, job: str, rank: int, step: int | None = None) -> RestoreSource:
        """A committed snapshot of the rank (the latest, or `step`), after its checksums are verified."""
        key = self._key(job, rank)
        with self._lock:
            slots = self._rank(key)
            slot = slots.committed_at(step)
            if slot is None:
                held = slots.committed_steps()
                which = "a committed snapshot" if step is None else f"step {step} (holds {held or 'none'})"
                raise NotFound(f"{key} has no {which} on this agent")
            segment = self._segments[(key, slot.index)]
        found = chunk_checksums(segment.buffer, slot.data_size_bytes, slot.meta, mapper=self._verifier.map)
        assert found is not None
        expected = slot.checksums if slot.checksums is not None else self._record_checksums(key, slot, found)
        if found != expected:
            raise CorruptSnapshot(
                f"{key} step {slot.step}: checksum mismatch in slot {slot.index} "
                f"({describe_mismatch(expected, found)}); the snapshot is not loaded"
            )
        return RestoreSource(
            step=slot.step,
            name=segment.name,
            size_bytes=slot.size_bytes,
            data_size_bytes=slot.data_size_bytes,
            meta=slot.meta,
            checksums=expected,
        )

    def begin_install(self, job: str, rank: int, step: int, size_bytes: int) -> InstallTarget:
        """Begins a slot of `size_bytes` for the rank's snapshot of `step`, rebuilt from peers' fragments.

        The rank is registered if it is not yet. Only the slot written now gets memory, and it is
        not pre-faulted: fragments are written into it through its file (`InstallTarget.writer`).
        Every target must end in `commit_install` or `abort_install`.
        """
        key = self._key(job, rank)
        attempt = self._attempts.get(job, _FIRST)  # the agent's own write: it speaks for the current attempt
        with self._lock:
            known = self._ranks.get(key)
        world_size = known.world_size if known is not None else rank + 1  # unknown here; the rank's client sets it
        self.register(job, rank, world_size, size_bytes, attempt, allocate=False)
        try:
            grant = self.begin(job, rank, step, size_bytes, attempt, prefault=False)
            with self._lock:
                buffer = self._segments[(key, grant.index)].buffer
            writer = self._shm.open_writer(grant.name)
        except BaseException:
            if known is None:
                with self._lock:
                    self._drop_rank(key, unlink=True)
            raise
        return InstallTarget(key=key, step=step, index=grant.index, writer=writer, buffer=buffer, created=known is None)

    def commit_install(self, target: InstallTarget, data_size_bytes: int, meta: bytes, checksums: tuple[int, ...]) -> Slot:
        """Commits the target's first `data_size_bytes` as the rank's snapshot, with the owner's checksums.

        Nothing is checksummed here: the restore that follows verifies the rebuilt bytes against
        the owner's `checksums` (one pass), so a rebuild from mismatched fragments is never loaded.
        """
        target.writer.close()
        with self._lock:
            slots = self._rank(target.key)
            slot = slots.commit(target.index, target.step, data_size_bytes, meta)
            slots.set_checksums(target.index, slot.commit_id, checksums)
            if self.protection_target(target.key.job, slots.attempt.generation) == target.step:
                slots.reserved.add(target.index)  # as `commit`: the step the job's ranks protect
            self._write_manifest(slots)
            return slots.slots[target.index]

    def abort_install(self, target: InstallTarget) -> None:
        """Ends a rebuild that failed: its slot is freed, and a rank registered for it alone is dropped."""
        target.writer.close()
        with self._lock:
            slots = self._ranks.get(target.key)
            if slots is None or not slots.abort_write(target.index, target.step):
                return  # moved on meanwhile (released, or registered again)
            if target.created and slots.latest is None:
                self._drop_rank(target.key, unlink=True)
            else:
                self._write_manifest(slots)
        log.info("aborted the rebuild of %s step=%d slot=%d", target.key, target.step, target.index)

    def release_job(self, job: str, up_to_generation: int | None = None, spare: frozenset[int] = frozenset()) -> tuple[int, int]:
        """Drops the job's ranks (those of attempts of `up_to_generation` and older; None: all;
        never the ranks in `spare`) with their slots; returns (ranks dropped, bytes freed)."""
        check_name(job, "job")
        with self._lock:
            keys = [
                k
                for k, r in self._ranks.items()
                if k.job == job and k.rank not in spare and (up_to_generation is None or r.attempt.generation <= up_to_generation)
            ]
            freed = sum(self._ranks[k].reserved_bytes() for k in keys)
            for key in keys:
                self._drop_rank(key, unlink=True)
            attempt = self._attempts.get(job)
            if attempt is not None and not spare and (up_to_generation is None or attempt.generation <= up_to_generation):
                del self._attempts[job]
        if keys:
            log.info("released job=%s ranks=%d bytes=%d", job, len(keys), freed)
        return len(keys), freed

    def snapshot_status(self) -> tuple[list[RankSlots], int, int]:
        """Copies of every rank's slots, memory used and the budget."""
        with self._lock:
            ranks = [
                RankSlots(key=r.key, world_size=r.world_size, slots=list(r.slots), latest=r.latest, attempt=r.attempt)
                for r in self._ranks.values()
            ]
            return ranks, self._budget.used_bytes, self._budget.limit_bytes

    def protection_work(self, targets: Callable[[str, int], int | None] = lambda job, generation: None) -> list[ProtectionWork]:
        """Per rank, the committed and checksummed snapshot to protect next, if any.

        `targets(job, generation)` is the step the coordinator aligns the job's ranks on
        (negative: nothing now), or None when it has not said: then the rank's newest commit.
        """
        work = []
        with self._lock:
            for key, slots in self._ranks.items():
                target = targets(key.job, slots.attempt.generation)
                slots.release_reservations(target)
                slot = slots.to_protect(target)
                if slot is not None:
                    work.append(self._work(key, slots, slot))
        return work

    def holds(self, job: str, rank: int) -> bool:
        with self._lock:
            return RankKey(job=job, rank=rank) in self._ranks

    def keep_for_persist(self, key: RankKey, attempt: Attempt, newer_than: int) -> list[int]:
        """Marks every committed snapshot of the rank's `attempt` newer than `newer_than` to be
        persisted (the rank died); returns their steps."""
        with self._lock:
            slots = self._ranks.get(key)
            if slots is None or slots.attempt != attempt:
                return []
            marked = [s for s in slots.slots if s.state is SlotState.COMMITTED and s.step > newer_than]
            slots.to_persist.update(s.index for s in marked)
            return sorted(s.step for s in marked)

    def job_world_size(self, job: str) -> int:
        """The world size the job's ranks registered with here (0: none here)."""
        with self._lock:
            return max((r.world_size for k, r in self._ranks.items() if k.job == job), default=0)

    def persist_work(self) -> list[tuple[ProtectionWork, Attempt]]:
        """Commits kept for persistence with their attempt, oldest step first. Those of an attempt
        the job has left (it restarted meanwhile) are released, never written."""
        work = []
        with self._lock:
            for key, slots in self._ranks.items():
                current = slots.attempt == self._attempts.get(key.job)
                for slot in slots.persist_work():
                    if current:
                        work.append((self._work(key, slots, slot), slots.attempt))
                    else:
                        slots.to_persist.discard(slot.index)
        return sorted(work, key=lambda w: w[0].step)

    def persist_backlog(self) -> int:
        """Commits kept for the filesystem and not copied out yet."""
        with self._lock:
            return sum(len(slots.to_persist) for slots in self._ranks.values())

    def release_persist(self, work: ProtectionWork) -> None:
        """The commit is copied out (or given up): its slot may be recycled again."""
        with self._lock:
            slots = self._ranks.get(work.key)
            if slots is not None and slots.is_current(work.index, work.commit_id):
                slots.to_persist.discard(work.index)

    def _work(self, key: RankKey, slots: RankSlots, slot: Slot) -> ProtectionWork:
        return ProtectionWork(
            key=key,
            index=slot.index,
            commit_id=slot.commit_id,
            step=slot.step,
            size_bytes=slot.data_size_bytes,
            meta=slot.meta,
            generation=slots.attempt.generation,
            checksums=slot.checksums or (),
        )

    def pin(self, work: ProtectionWork) -> memoryview | None:
        """The bytes of a commit, held still until `unpin` (begin refuses the slot meanwhile)."""
        with self._lock:
            slots = self._ranks.get(work.key)
            if slots is None or not slots.is_current(work.index, work.commit_id):
                return None
            slots.pin(work.index)
            return self._segments[(work.key, work.index)].buffer[: work.size_bytes]

    def unpin(self, work: ProtectionWork) -> None:
        with self._lock:
            slots = self._ranks.get(work.key)
            if slots is not None:
                slots.unpin(work.index)

    def mark_protected(self, work: ProtectionWork, holders: tuple[str, ...] = ()) -> bool:
        """Records that `holders` (by fragment index) acknowledged every fragment of the commit."""
        with self._lock:
            slots = self._ranks.get(work.key)
            if slots is None or not slots.set_protected(work.index, work.commit_id, holders):
                return False
            slots.reserved.discard(work.index)  # protected: the trainer may write over it now
            self._write_manifest(slots)
            return True

    def unprotect_unless_held_by(self, valid: frozenset[str]) -> list[tuple[RankKey, Slot]]:
        """Marks unprotected every commit with a fragment on a node outside `valid` (one being
        drained, or gone from the group), so that it is protected again with the holders of now.
        Returns each (rank, slot as it was)."""
        changed: list[tuple[RankKey, Slot]] = []
        with self._lock:
            for key, slots in self._ranks.items():
                found = slots.unprotect_unless_held_by(valid)
                if found:
                    self._write_manifest(slots)
                    changed.extend((key, slot) for slot in found)
        return changed

    def held(self) -> tuple[Held, ...]:
        """Every committed snapshot held here, for the coordinator's inventory."""
        ranks, _, _ = self.snapshot_status()
        return tuple(
            Held(job=r.key.job, rank=r.key.rank, step=s.step, generation=r.attempt.generation, protected=s.protected)
            for r in ranks
            for s in r.slots
            if s.state is SlotState.COMMITTED
        )

    def memory_used_bytes(self) -> int:
        with self._lock:
            return self._budget.used_bytes

    def slot_names(self, slots: RankSlots) -> list[str]:
        return [self._slot_name(slots.key, s) for s in slots.slots]

    def _admit(self, key: RankKey, attempt: Attempt, registering: bool) -> Attempt:
        """Fences zombies of an earlier attempt of the job (see `admit_attempt`)."""
        return admit_attempt(self._attempts.get(key.job), attempt, registering, key.job)

    # -- internals -----------------------------------------------------------------

    def _key(self, job: str, rank: int) -> RankKey:
        check_name(job, "job")
        if rank < 0:
            raise InvalidRequest(f"job {job!r}: rank must be >= 0, got {rank}")
        return RankKey(job=job, rank=rank)

    def _rank(self, key: RankKey) -> RankSlots:
        slots = self._ranks.get(key)
        if slots is None:
            raise NotFound(f"{key} is not registered with this agent")
        return slots

    def _grown_total(self, slots: RankSlots, size_bytes: int) -> int:
        writable = slots.writable()
        sizes = [s.size_bytes if i != writable else max(s.size_bytes, size_bytes) for i, s in enumerate(slots.slots)]
        return max(sum(sizes), self._budget.held.get(str(slots.key), 0))

    def _slot_name(self, key: RankKey, slot: Slot) -> str:
        return f"{self._prefix}{key.job}.r{key.rank}.s{slot.index}.v{slot.version}"

    def _manifest_name(self, key: RankKey) -> str:
        return f"{self._prefix}{key.job}.r{key.rank}.manifest"

    def _replace_segment(self, key: RankKey, slot: Slot) -> None:
        """Unlinks a slot's old segment (a late writer keeps only an orphan) and creates its new version."""
        old_name = self._slot_name(key, replace(slot, version=slot.version - 1))
        self._unmap(key, slot.index, old_name, unlink=True)
        self._map_new(key, slot)

    def _map_new(self, key: RankKey, slot: Slot, prefault: bool = True) -> None:
        name = self._slot_name(key, slot)
        self._segments[(key, slot.index)] = self._shm.create_segment(name, slot.size_bytes)
        if prefault:
            self._prefaulter.submit(self._shm.prefault, name)

    def _unmap(self, key: RankKey, index: int, name: str, unlink: bool) -> None:
        segment = self._segments.pop((key, index), None)
        if segment is not None:
            segment.close()
        if unlink:
            self._shm.unlink(name)

    def _drop_rank(self, key: RankKey, unlink: bool) -> None:
        slots = self._ranks.pop(key)
        for slot in slots.slots:
            self._unmap(key, slot.index, self._slot_name(key, slot), unlink)
        if unlink:
            self._shm.unlink(self._manifest_name(key))
        self._budget.release(str(key))

    def _write_manifest(self, slots: RankSlots) -> None:
        self._shm.write_file_atomic(self._manifest_name(slots.key), encode_manifest(slots))

    def _record_checksums(self, key: RankKey, slot: Slot, checksums: tuple[int, ...]) -> tuple[int, ...]:
        with self._lock:
            slots = self._ranks.get(key)
            if slots is not None and slots.set_checksums(slot.index, slot.commit_id, checksums):
                self._write_manifest(slots)
        return checksums

    def _checksum_loop(self) -> None:
        while (item := self._pending.get()) is not None:
            key, index, commit_id = item
            try:
                self._checksum_one(key, index, commit_id)
            except Exception:  # one bad slot must not stop the checksummer
                log.exception("checksum failed %s slot=%d", key, index)

    def _checksum_one(self, key: RankKey, index: int, commit_id: int) -> None:
        def is_current() -> bool:
            slots = self._ranks.get(key)
            return slots is not None and slots.is_current(index, commit_id)

        with self._lock:
            if not is_current():
                return
            slot = self._ranks[key].slots[index]
            segment = self._segments[(key, index)]
        # one thread: this runs beside training, which needs the other cores
        checksums = chunk_checksums(segment.buffer, slot.data_size_bytes, slot.meta, keep_going=is_current)
        if checksums is not None:
            self._record_checksums(key, slot, checksums)

    def _adopt_manifest(self, name: str) -> int:
        try:
            slots = decode_manifest(self._shm.read_file(name))
            key = self._key(slots.key.job, slots.key.rank)
        except (MemckptError, OSError) as exc:
            log.error("ignoring manifest name=%s: %s", name, exc)
            return 0
        abandoned = set(slots.abandon_writes())  # their old segments are orphans now, removed below
        for slot in slots.slots:
            try:
                if slot.index in abandoned:
                    self._map_new(key, slot)
                    continue
                segment = self._shm.open_segment(self._slot_name(key, slot))
                if segment.size_bytes != slot.size_bytes:
                    raise NotFound(f"segment size {segment.size_bytes} != {slot.size_bytes}")
                self._segments[(key, slot.index)] = segment
            except (MemckptError, OSError) as exc:
                log.error("cannot adopt %s slot=%d: %s; recreating it empty", key, slot.index, exc)
                if slots.latest == slot.index:
                    slots.latest = None
                slots.slots[slot.index] = Slot(index=slot.index, version=slot.version + 1, size_bytes=slot.size_bytes)
                self._map_new(key, slots.slots[slot.index])
        self._ranks[key] = slots
        current = self._attempts.get(key.job)
        if current is None or slots.attempt.generation > current.generation:
            self._attempts[key.job] = slots.attempt  # best effort: the newest attempt any rank recorded
        self._budget.adopt(str(key), slots.reserved_bytes())
        self._write_manifest(slots)
        latest = slots.latest_committed()
        if latest is not None and latest.checksums is None:
            self._pending.put((key, latest.index, latest.commit_id))
        log.info("adopted %s committed_step=%s", key, latest.step if latest else None)
        return 1


def _world_size_of(meta: bytes) -> int:
    """The world size the client wrote into a snapshot's metadata (0: none, or not JSON)."""
    try:
        value = json.loads(meta).get("world_size", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0
