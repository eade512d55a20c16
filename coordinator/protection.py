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

Only the job's current generation counts: a restarted job goes back in steps, and the
steps it commits again are other snapshots than the ones the same numbers had before.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

NONE = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class RankProgress:
    """One rank's steps in the job's current generation, from the agents' inventories."""

    committed: Set[int] = frozenset()  # whole copies its owner holds (the latest and the one before)
    complete: Set[int] = frozenset()  # steps whose k+m fragments are all held by peers


@dataclass(frozen=True, slots=True, kw_only=True)
class JobProtection:
    generation: int
    target: int = NONE  # NONE: nothing to protect now (wait for the next commit)
    keep: int = NONE  # NONE: no step is protected for every rank yet


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
    if current_target > keep and all(_can_still_protect(p, current_target, advancing) for p in progress):
        return JobProtection(generation=generation, target=current_target, keep=keep)
    if not advancing:
        held_by_all = _held_by_all([p.committed for p in progress])
        return JobProtection(generation=generation, target=max((s for s in held_by_all if s > keep), default=NONE), keep=keep)
    newest = max((max(p.committed, default=NONE) for p in progress), default=NONE)
    if newest == NONE:
        return JobProtection(generation=generation, target=NONE, keep=keep)
    return JobProtection(generation=generation, target=max(newest + lead, keep + 1), keep=keep)


def _held_by_all(sets: list[Set[int]]) -> set[int]:
    """The steps in every one of `sets` (none when there are no sets); tens of thousands of ranks cost milliseconds."""
    return set(sets[0]).intersection(*sets[1:]) if sets else set()


def _can_still_protect(progress: RankProgress, target: int, advancing: bool) -> bool:
    """Protected it already, holds it now, or (while the job advances) has not reached it yet."""
    if target in progress.complete or target in progress.committed:
        return True
    return advancing and target > max(progress.committed, default=NONE)
