"""Which step the ranks of a job protect next, and which protected step holders must keep. Pure logic.

Each owner protects on its own thread at its own pace, skipping steps when peers are
slower than snapshots. Left alone, ranks would protect different steps, and after a node
loss no step could be restored for every rank. So the coordinator aligns them:

- `keep`: the newest step whose fragment sets are complete for every rank of the job.
  Holders keep that set until a newer step is complete for every rank: the job can
  always be restored from it.
- `target`: the step every owner protects next, chosen a little ahead of the newest
  commit (`lead` steps: what the job commits while the word travels), so that each owner
  protects it the moment it commits it. Once chosen it stays the target until every rank
  has protected it, unless a rank can no longer protect it (it recycled that step's slot
  unprotected, or skipped the step): then a new target ahead of the newest commit follows.
  A target never lies behind a step a rank has already protected: holders keep each rank's
  newest set and refuse older ones, so such a target could never be protected.
- Whether the job advances, and how far ahead (`lead`) a target lies, come from the job's
  pace (`JobPace`): the time it takes per step, measured at the refreshes. A job slower
  than the refreshes commits nothing in most of them and still advances.

Only the job's current generation counts: a restarted job goes back in steps, and the
steps it commits again are other snapshots than the ones the same numbers had before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import NamedTuple

NONE = -1
LEAD_REFRESHES = 4  # a target lies as many steps ahead as the job commits in this many refreshes
STILL_STEPS = 3  # a job that committed nothing for this many of its steps stands still...
STILL_REFRESHES = 2  # ...and for at least this many refreshes
MAX_LEAD = 1000


class RankProgress(NamedTuple):
    """One rank's steps in the job's current generation, from the agents' inventories (a named
    tuple: the coordinator builds one for each rank that changed, 16,000 at every refresh of a
    large job)."""

    committed: Set[int] = frozenset()  # whole copies its owner holds (the latest and the one before)
    complete: Set[int] = frozenset()  # steps whose k+m fragments are all held by peers


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProtection:
    generation: int
    target: int = NONE  # NONE: nothing to protect now (wait for the next commit)
    keep: int = NONE  # NONE: no step is protected for every rank yet
    released: bool = False  # the job was released: agents drop what they hold of `generation` and older


def job_protection(
    generation: int, world_size: int, ranks: Mapping[int, RankProgress], current_target: int = NONE, lead: int = 1
) -> JobProtection:
    """The job's protection target and kept step, given the target it had until now.

    While the job advances (`lead` > 0) a new target lies `lead` steps ahead of the newest
    commit: by the time the owners hear of it they have not recycled it yet, and they
    protect it as soon as they commit it. When the job stands still (`lead` 0: no commit
    since the last look) the target is the newest step every rank holds, so the last
    snapshots of a paused or finished job get protected too.
    """
    progress = [ranks.get(rank, RankProgress()) for rank in range(world_size)]
    protected_by_all = _held_by_all([p.complete for p in progress])
    keep = max(protected_by_all, default=NONE)
    advancing = lead > 0
    if current_target > keep and _all_can_still_protect(progress, current_target, advancing):
        return JobProtection(generation=generation, target=current_target, keep=keep)
    if not advancing:
        candidates = {s for p in progress for s in p.committed | p.complete}
        protectable = (s for s in candidates if s > keep and _all_can_still_protect(progress, s, False))
        return JobProtection(generation=generation, target=max(protectable, default=NONE), keep=keep)
    newest = max((max(p.committed, default=NONE) for p in progress), default=NONE)
    if newest == NONE:
        return JobProtection(generation=generation, target=NONE, keep=keep)
    return JobProtection(generation=generation, target=max(newest + lead, keep + 1), keep=keep)


@dataclass(slots=True)
class JobPace:
    """How fast a job commits, from its newest commit seen at each of the coordinator's
    refreshes: `lead` (0 while it stands still) for `job_protection`.

    Steps that take longer than a refresh land in one refresh out of several; a job is
    still only when it has committed nothing for several of its own steps (`STILL_STEPS`),
    so that a target ahead of a slow job is not given up between two of its commits.
    """

    generation: int = 0
    newest: int = NONE
    advanced_at: float = 0.0  # when `newest` was first seen
    step_s: float = 0.0  # seconds per step, smoothed over the advances; 0: not measured yet

    def lead(self, generation: int, newest: int, now: float, refresh_s: float) -> int:
        """Records the job's newest commit at time `now`; returns how many steps ahead of it
        the next target lies (at least 1 while the job advances), or 0 when it stands still or
        has not been seen to advance yet. `refresh_s`: the time between two refreshes."""
        # A lower newest step within a generation is no restart (a rank's latest being written over
        # shows its older step for a moment): only a new generation is measured again.
        if generation != self.generation:
            self.generation, self.newest, self.advanced_at, self.step_s = generation, newest, now, 0.0
        elif newest > self.newest:
            if self.newest != NONE:
                per_step = max(now - self.advanced_at, 1e-6) / (newest - self.newest)
                self.step_s = per_step if self.step_s == 0.0 else (self.step_s + per_step) / 2
            self.newest, self.advanced_at = newest, now
        if self.step_s == 0.0:  # not seen to advance yet (a job seen first, or restarted): its steps are there now
            return 0
        if now - self.advanced_at > max(STILL_STEPS * self.step_s, STILL_REFRESHES * refresh_s):
            return 0
        return max(1, min(MAX_LEAD, math.ceil(round(LEAD_REFRESHES * refresh_s / self.step_s, 6))))


def _held_by_all(sets: list[Set[int]]) -> set[int]:
    """The steps in every one of `sets` (none when there are no sets); tens of thousands of ranks cost milliseconds."""
    return set(sets[0]).intersection(*sets[1:]) if sets else set()


def _all_can_still_protect(progress: list[RankProgress], target: int, advancing: bool) -> bool:
    """Whether every rank protected `target` already, holds it now and has protected nothing
    newer (holders refuse an older set than the one they keep), or (while the job advances)
    has not reached it yet. One loop without a call per rank: a job of 16,000 ranks is looked
    at on every refresh, while the coordinator's heartbeats wait."""
    for p in progress:
        complete = p.complete
        if target in complete:
            continue
        if complete and target <= max(complete):
            return False
        committed = p.committed
        if target in committed:
            continue
        if not advancing or (committed and target <= max(committed)):
            return False
    return True
