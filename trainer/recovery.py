"""Which step a restarted job restores: the newest one that every rank still holds. Pure logic.

Ranks die at slightly different points, so one may have committed step N while another
holds only N-1; each agent keeps the snapshot before the latest for exactly this case.
When ranks hold snapshots but no step is common to all of them, memory cannot restore the
job: that is an error, never a silent fresh start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class StepChoice:
    step: int | None
    reason: str
    lost: bool = False  # ranks held snapshots, but no step every rank can restore


def choose_common_step(steps_by_rank: Sequence[Sequence[int]]) -> StepChoice:
    """The newest step held by every rank, or None with the reason (a fresh job, or `lost`: no common step)."""
    if not steps_by_rank or all(not steps for steps in steps_by_rank):
        return StepChoice(step=None, reason="no rank holds a snapshot: a fresh start")
    common = set(steps_by_rank[0]).intersection(*map(set, steps_by_rank[1:]))
    if not common:
        held = {rank: sorted(steps) for rank, steps in enumerate(steps_by_rank)}
        missing = [rank for rank, steps in held.items() if not steps]
        detail = f"ranks {missing} hold none" if missing else "their steps do not overlap"
        return StepChoice(
            step=None, reason=f"memory cannot restore the job: no step is held by every rank ({detail}; held: {held})", lost=True
        )
    step = max(common)
    return StepChoice(step=step, reason=f"step {step} is the newest held by all {len(steps_by_rank)} ranks")
