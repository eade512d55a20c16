"""The slot state machine of one (job, rank), and the agent's memory budget. Pure logic.

Each rank owns two slots. Invariants:
- a slot goes FREE -> WRITING(step) -> COMMITTED(step), and a committed slot may be written
  again (COMMITTED -> WRITING) or dropped (-> FREE);
- a write never leaves the rank without a whole committed snapshot: the slot written is the
  older one, so the one before the latest stays readable until the next write begins and
  ranks that died one step apart can still agree on a common step;
- a slot being read (pinned), kept until protected (reserved) or kept until persisted
  (to_persist) is never handed out. When the older slot is kept for a step every rank of the
  job keeps alike (the coordinator's protection target, a step to persist), the latest is
  written over instead: the kept one is the whole snapshot a restore finds meanwhile, and the
  step the ranks have in common. Snapshots go on at every step however long protection or
  persistence of it takes. Otherwise (an older slot read by this rank alone, or both kept)
  the snapshot is skipped.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from dataclasses import dataclass, field, replace

from memckpt.errors import BudgetExceeded, InvalidRequest, StaleGeneration, Unavailable
from memckpt.sizes import format_size

SLOTS_PER_RANK = 2


class SlotState(enum.Enum):
    FREE = "free"
    WRITING = "writing"
    COMMITTED = "committed"


ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    SlotState.FREE: frozenset({SlotState.WRITING}),
    SlotState.WRITING: frozenset({SlotState.COMMITTED, SlotState.FREE, SlotState.WRITING}),
    SlotState.COMMITTED: frozenset({SlotState.FREE, SlotState.WRITING}),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RankKey:
    job: str
    rank: int

    def __str__(self) -> str:
        return f"job {self.job!r} rank {self.rank}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """One shared-memory segment and what it holds. `version` changes when it is reallocated."""

    index: int
    version: int
    size_bytes: int
    state: SlotState = SlotState.FREE
    step: int = -1
    data_size_bytes: int = 0
    checksums: tuple[int, ...] | None = None  # crc32c per chunk of the data, then of the meta
    meta: bytes = b""
    commit_id: int = 0  # grows with every commit of the rank: tells a re-commit of one step apart
    protected: bool = False  # every fragment of this commit is acknowledged by its peer
    protected_by: tuple[str, ...] = ()  # those peers, by fragment index (empty: not known, or not protected)

    def moved_to(self, state: SlotState, **changes: object) -> Slot:
        if state not in ALLOWED[self.state]:
            raise AssertionError(f"slot {self.index}: {self.state.value} -> {state.value} is not allowed")
        return replace(self, state=state, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One attempt of a job: the launcher's run id and the restart count within it (+1)."""

    run_id: str = ""
    generation: int = 0


@dataclass(slots=True, kw_only=True)
class RankSlots:
    """The two slots of one rank and the order of its snapshots.

    Call order: `begin(step)` -> the client writes the slot -> `commit(index, step, ...)`.
    `session_step` is the newest step begun since the rank (re)registered: steps must grow
    within a session, and may go back only after a new registration (a restored job).
    """

    key: RankKey
    world_size: int
    slots: list[Slot]
    session_step: int = -1
    latest: int | None = None  # index of the latest committed slot
    commits: int = 0
    pinned: Counter[int] = field(default_factory=Counter)  # slots being read (protection, persistence), by readers
    reserved: set[int] = field(default_factory=set)  # committed at the protection target: kept until protected
    to_persist: set[int] = field(default_factory=set)  # committed at a step to persist: kept until copied out
    attempt: Attempt = field(default_factory=Attempt)  # the job attempt that registered this rank last

    def latest_committed(self) -> Slot | None:
        return None if self.latest is None else self.slots[self.latest]

    def committed_steps(self) -> list[int]:
        """Steps this rank can restore, newest first."""
        return sorted((s.step for s in self.slots if s.state is SlotState.COMMITTED), reverse=True)

    def committed_at(self, step: int | None) -> Slot | None:
        """The committed slot of `step` (None: the latest), if this rank still holds it."""
        if step is None:
            return self.latest_committed()
        found = [s for s in self.slots if s.state is SlotState.COMMITTED and s.step == step]
        return max(found, key=lambda s: s.commit_id) if found else None

    def to_protect(self, target: int | None) -> Slot | None:
        """The committed, checksummed, unprotected slot to protect next: the one of `target`
        (the step the coordinator aligns the job's ranks on; a negative target: none now), or
        without a target the latest."""
        if target is not None and target < 0:
            return None
        slot = self.committed_at(target)
        if slot is None or slot.checksums is None or slot.protected:
            return None
        return slot

    def begin(self, step: int, size_bytes: int) -> tuple[Slot, bool]:
        """Moves the slot `writable()` names to WRITING(step), whatever it held.

        Returns the slot and whether it must be reallocated to fit `size_bytes`.
        """
        index = self.check_begin(step)
        if index == self.latest:
            self.latest = 1 - index  # the kept older snapshot is the newest whole one while this is written
        slot = self.slots[index]
        grow = slot.size_bytes < size_bytes
        self.slots[index] = slot.moved_to(
            SlotState.WRITING,
            step=step,
            data_size_bytes=0,
            checksums=None,
            meta=b"",
            protected=False,
            protected_by=(),
            size_bytes=max(slot.size_bytes, size_bytes),
            version=slot.version + int(grow),
        )
        self.session_step = step
        return self.slots[index], grow

    def check_begin(self, step: int) -> int:
        """The slot `begin(step)` would take, or the error it would raise; changes nothing."""
        if step <= self.session_step:
            raise StaleGeneration(f"{self.key}: snapshot of step {step} after step {self.session_step} in the same session")
        index = self.writable()
        if index is None:
            slots = ", ".join(self._describe(i) for i in range(len(self.slots)))
            raise Unavailable(f"{self.key}: {slots}; no slot to write: snapshot {step} skipped")
        return index

    def writable(self) -> int | None:
        """The slot the next snapshot is written into, or None when both are kept (see the module's doc)."""
        if self.latest is None:
            return self._first_free()
        older = 1 - self.latest
        if not self._kept(older):
            return older
        # Only a step the job's ranks keep alike (the protection target, a step to persist) is written
        # around: one read by this rank alone (a send without a target) would leave it without a step
        # in common with ranks that wrote their older slot.
        job_wide = older in self.reserved or older in self.to_persist
        if job_wide and self.slots[older].state is SlotState.COMMITTED and not self._kept(self.latest):
            return self.latest
        return None

    def _kept(self, index: int) -> bool:
        return bool(self._kept_for(index))

    def _kept_for(self, index: int) -> list[str]:
        """Why slot `index` may not be written now (empty: it may)."""
        reasons = (
            ("being read", index in self.pinned),
            ("kept until protected", index in self.reserved),
            ("kept until persisted", index in self.to_persist),
        )
        return [why for why, kept in reasons if kept]

    def _describe(self, index: int) -> str:
        why = self._kept_for(index)
        return f"slot {index} (step {self.slots[index].step}{': ' + ' and '.join(why) if why else ''})"

    def commit(self, index: int, step: int, data_size_bytes: int, meta: bytes) -> Slot:
        """Makes slot `index` the latest committed snapshot; the previous one stays as the older."""
        if not 0 <= index < len(self.slots):
            raise InvalidRequest(f"{self.key}: slot index {index} out of range 0..{len(self.slots) - 1}")
        slot = self.slots[index]
        if slot.state is not SlotState.WRITING or slot.step != step:
            raise StaleGeneration(
                f"{self.key}: commit of step {step} into slot {index}, which is {slot.state.value} at step {slot.step}"
            )
        if data_size_bytes > slot.size_bytes:
            raise InvalidRequest(f"{self.key} step {step}: {data_size_bytes} bytes claimed in a slot of {slot.size_bytes}")
        self.commits += 1
        self.slots[index] = slot.moved_to(SlotState.COMMITTED, data_size_bytes=data_size_bytes, meta=meta, commit_id=self.commits)
        self.latest = index  # the previous latest stays committed (and readable) until rewritten
        return self.slots[index]

    def abort_write(self, index: int, step: int) -> bool:
        """Frees slot `index` if it is still WRITING(step): a write that cannot finish (a rebuild
        from peers that failed) leaves nothing behind. False if the slot moved on meanwhile."""
        slot = self.slots[index]
        if slot.state is not SlotState.WRITING or slot.step != step:
            return False
        self.slots[index] = slot.moved_to(SlotState.FREE, step=-1, data_size_bytes=0, meta=b"")
        return True

    def is_current(self, index: int, commit_id: int) -> bool:
        """Whether slot `index` still holds the commit `commit_id` (readers check this)."""
        slot = self.slots[index]
        return slot.state is SlotState.COMMITTED and slot.commit_id == commit_id

    def release_reservations(self, target: int | None) -> None:
        """Frees reserved slots that are no longer the protection target (or are protected), and
        reserves the target's slot where the target came after its commit: a step chosen from what
        is committed already (a restarted job's first target) is kept until it is sent, as a
        target known at its commit is, not written over by the next snapshot but one."""
        for index in list(self.reserved):
            slot = self.slots[index]
            if slot.state is not SlotState.COMMITTED or slot.protected or slot.step != target:
                self.reserved.discard(index)
        if target is None or target < 0:
            return
        kept = self.committed_at(target)  # the newest commit of it: both slots may hold the step
        if kept is None or kept.protected or kept.index in self.reserved:
            return
        if not any(self._kept(other.index) for other in self.slots if other.index != kept.index):
            self.reserved.add(kept.index)  # never both slots kept: snapshots would stop until it is sent

    def pin(self, index: int) -> None:
        self.pinned[index] += 1

    def unpin(self, index: int) -> None:
        if self.pinned[index] <= 1:
            del self.pinned[index]
        else:
            self.pinned[index] -= 1

    def set_protected(self, index: int, commit_id: int, holders: tuple[str, ...] = ()) -> bool:
        """Marks a commit protected by `holders` (by fragment index); False if the slot moved on meanwhile."""
        if not self.is_current(index, commit_id):
            return False
        self.slots[index] = replace(self.slots[index], protected=True, protected_by=holders)
        return True

    def unprotect_unless_held_by(self, valid: frozenset[str]) -> list[Slot]:
        """Marks unprotected each protected commit that a node outside `valid` (the peers that may
        hold this rank's fragments now) holds a fragment of: it is protected again, elsewhere.
        Returns the slots as they were. A commit whose holders are not known is left as it is."""
        changed = []
        for i, slot in enumerate(self.slots):
            if slot.protected and slot.protected_by and not valid.issuperset(slot.protected_by):
                changed.append(slot)
                self.slots[i] = replace(slot, protected=False, protected_by=())
        return changed

    def set_checksums(self, index: int, commit_id: int, checksums: tuple[int, ...]) -> bool:
        """Records the checksums of a committed slot, once; False if it moved on or has them already.

        The first record wins: the owner's checksums of a rebuilt snapshot must not be replaced
        by ones computed over the rebuilt bytes.
        """
        slot = self.slots[index]
        if not self.is_current(index, commit_id) or slot.checksums is not None:
            return False
        self.slots[index] = replace(slot, checksums=checksums)
        return True

    def persist_work(self) -> list[Slot]:
        """Committed slots kept for persistence (dropping marks whose slot moved on)."""
        self.to_persist = {i for i in self.to_persist if self.slots[i].state is SlotState.COMMITTED}
        return [self.slots[i] for i in sorted(self.to_persist)]

    def abandon_writes(self) -> list[int]:
        """Frees slots left WRITING (by a dead writer, or a zombie still copying); returns them.

        Each gets a new version: its memory must be replaced, so that a writer of an earlier
        attempt still copying lands in an orphaned mapping, never in the next snapshot.
        Committed slots are kept.
        """
        abandoned = []
        for i, slot in enumerate(self.slots):
            if slot.state is SlotState.WRITING:
                self.slots[i] = slot.moved_to(SlotState.FREE, step=-1, data_size_bytes=0, meta=b"", version=slot.version + 1)
                abandoned.append(i)
        self.session_step = -1
        return abandoned

    def reserved_bytes(self) -> int:
        return sum(slot.size_bytes for slot in self.slots)

    def _first_free(self) -> int:
        for i, slot in enumerate(self.slots):
            if slot.state is not SlotState.COMMITTED:
                return i
        raise AssertionError(f"{self.key}: no free slot while none is latest")


def admit_attempt(current: Attempt | None, request: Attempt, registering: bool, job: str) -> Attempt:
    """The job's attempt after this request, or StaleGeneration for a zombie of an earlier one.

    Within one run (torchrun restarts), older generations are refused. A new run (the job
    requeued) supersedes the old one when its ranks register; requests of the old run that
    do not register again are refused from then on.
    """
    if current is None:
        return request
    if request.run_id == current.run_id:
        if request.generation < current.generation:
            raise StaleGeneration(
                f"job {job!r}: generation {request.generation} is older than the current generation "
                f"{current.generation} (a process of an earlier attempt); refused"
            )
        return request if request.generation > current.generation else current
    if registering:
        return request
    raise StaleGeneration(f"job {job!r}: request of run {request.run_id!r}, but the job now runs as {current.run_id!r}; refused")


def new_rank_slots(key: RankKey, world_size: int, slot_size_bytes: int) -> RankSlots:
    slots = [Slot(index=i, version=0, size_bytes=slot_size_bytes) for i in range(SLOTS_PER_RANK)]
    return RankSlots(key=key, world_size=world_size, slots=slots)


@dataclass(slots=True, kw_only=True)
class MemoryBudget:
    """Bytes the agent may hold in shared memory, and who holds how much.

    Shared by the slot store and the fragment store, each under its own lock, so the
    budget takes its own: a check and its reservation happen as one step.
    """

    limit_bytes: int
    held: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self.held.values())

    def reserve(self, owner: str, size_bytes: int, why: str) -> None:
        """Sets `owner`'s holding to `size_bytes`, or raises BudgetExceeded naming the sizes."""
        with self._lock:
            extra = size_bytes - self.held.get(owner, 0)
            used = sum(self.held.values())
            free = self.limit_bytes - used
            if extra > free:
                raise BudgetExceeded(
                    f"{why} asks {format_size(extra)} more; {format_size(free)} free of "
                    f"{format_size(self.limit_bytes)} budget ({format_size(used)} used)"
                )
            self.held[owner] = size_bytes

    def adopt(self, owner: str, size_bytes: int) -> None:
        """Records what an earlier agent left (re-adopted at start), even beyond the budget."""
        with self._lock:
            self.held[owner] = size_bytes

    def release(self, owner: str) -> None:
        with self._lock:
            self.held.pop(owner, None)
