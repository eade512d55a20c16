"""Which step of a job is persisted next, and when its checkpoint is made visible. Pure logic.

A persisted checkpoint is useful only whole: every rank's files of one step. So the ranks
persist the same step, chosen here, and the checkpoint's global metadata is written (which
makes it visible) only once every rank's files are written:

- `persist`: the step every rank's agent writes now. When the policy says one is due (every
  `every_steps` steps, or `interval_s` seconds, since the last one chosen) it is the job's
  protection target: the owners keep that slot from its commit until it is written, as they
  keep it until protected, so no rank recycles it first. It stays chosen until its
  checkpoint is complete, or a rank can no longer write it (gone past it without writing).
- `finalize`: that same step once every rank reports its files written: the agent of rank 0
  then writes the global metadata, and reports the step complete.

Without a coordinator an agent applies the same rules to the ranks it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, replace

NONE = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistPolicy:
    """When a job persists: every so many steps, or so many seconds (0: not by that measure)."""

    every_steps: int = 0
    interval_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.interval_s > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPersistence:
    """One rank's progress towards the filesystem in the job's current generation."""

    committed: Set[int] = frozenset()  # steps its owner holds now
    written: Set[int] = frozenset()  # steps whose files for this rank are complete on the filesystem


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPersistence:
    generation: int
    persist: int = NONE  # the step being persisted now (NONE: none)
    finalize: int = NONE  # `persist`, once every rank has written it: write the metadata now
    complete: int = NONE  # the newest step whose checkpoint is complete (visible)
    chosen_at: float = 0.0  # when `persist` was chosen, or the last one was (for interval_s)
    chosen_step: int = NONE  # the last step chosen (for every_steps)


def job_persistence(
    policy: PersistPolicy,
    previous: JobPersistence,
    world_size: int,
    ranks: Mapping[int, RankPersistence],
    *,
    target: int,
    complete: int,
    now: float,
) -> JobPersistence:
    """The job's persistence after this look, given the one before, the ranks' progress, the
    job's protection `target` (the step owners will keep), the newest complete checkpoint the
    agents report, and the time."""
    state = replace(previous, finalize=NONE, complete=max(previous.complete, complete))
    progress = [ranks.get(rank, RankPersistence()) for rank in range(world_size)]
    if state.persist != NONE:
        if state.complete >= state.persist:
            state = _cleared(state)  # done
        elif all(state.persist in p.written for p in progress):
            return replace(state, finalize=state.persist)
        elif all(_can_still_write(p, state.persist) for p in progress):
            return state
        else:
            state = replace(_cleared(state), chosen_step=NONE, chosen_at=0.0)  # a rank recycled it unwritten: again at once
    if not policy.enabled or target < 0 or target <= state.complete:
        return state
    since = max(state.chosen_step, 0)  # the first one: `every_steps` into the job
    due_by_steps = policy.every_steps > 0 and target - since >= policy.every_steps
    due_by_time = policy.interval_s > 0 and now - state.chosen_at >= policy.interval_s
    if not (due_by_steps or due_by_time):
        return state
    return replace(state, persist=target, chosen_at=now, chosen_step=target)


def _can_still_write(progress: RankPersistence, step: int) -> bool:
    """Wrote it already, holds it now, or has not reached it yet."""
    return step in progress.written or step in progress.committed or step > max(progress.committed, default=NONE)


def _cleared(state: JobPersistence) -> JobPersistence:
    return replace(state, persist=NONE, finalize=NONE)
