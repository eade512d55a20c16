"""Which step the ranks of a job protect next, and which protected step holders must keep. Pure logic.

Each owner protects on its own thread at its own pace, skipping steps when peers are
slower than snapshots. Left alone, ranks would protect different steps, and after a node
loss no step could be restored for every rank. So the coordinator aligns them:

- `keep`: the newest step whose fragment sets are complete for every rank of the job.
  Holders keep that set until a newer step is complete for every rank: the job can
  always be restored from it.
- `target`: the step every owner protects next: the newest step that every rank has
  committed and still holds, newer than `keep`. Once chosen it stays the target until
  every rank has protected it, unless a rank can no longer protect it (its slot was
  recycled before its agent got to it): then a newer common step replaces it.

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
    generation: int, world_size: int, ranks: Mapping[int, RankProgress], current_target: int = NONE
) -> JobProtection:
    """The job's protection target and kept step, given the target it had until now."""
    progress = [ranks.get(rank, RankProgress()) for rank in range(world_size)]
    protected_by_all = set.intersection(*(set(p.complete) for p in progress)) if progress else set()
    keep = max(protected_by_all, default=NONE)
    if current_target > keep and all(current_target in p.complete or current_target in p.committed for p in progress):
        return JobProtection(generation=generation, target=current_target, keep=keep)
    held_by_all = set.intersection(*(set(p.committed) for p in progress)) if progress else set()
    target = max((step for step in held_by_all if step > keep), default=NONE)
    return JobProtection(generation=generation, target=target, keep=keep)
