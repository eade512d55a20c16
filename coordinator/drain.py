"""Draining a node before maintenance: whether it may start, and how far it is. Pure logic.

A draining node stays a member and keeps owning its ranks, but holds no fragments for others:
their owners protect their steps on other agents, and the node drops what it held once the
coordinator's kept step of each job is protected without it. It is drained when it holds no
fragment set of another node's rank, and every rank it owns has a step protected on other
agents, common to its whole job: killing it then loses nothing that memory cannot restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memckpt.coordinator.protection import NONE, RankProgress
from memckpt.errors import FailedPrecondition

if TYPE_CHECKING:
    from memckpt.coordinator.cluster import Held  # which imports this module

EXAMPLES = 3  # (job, rank, step) named in a reason, at most


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainProgress:
    node: str
    alive: bool
    draining: bool
    drained: bool
    fragment_sets_held: int  # of other nodes' ranks
    ranks_owned: int  # ranks whose snapshots it holds, in their job's current attempt
    ranks_protected: int  # of those, with a step protected by other agents
    reason: str


def check_can_drain(node: str, others: list[str], k: int, m: int) -> None:
    """Raises FailedPrecondition unless `others` (the live agents that would still hold
    fragments) can form a protection group without `node`."""
    size = k + m + 1
    if len(others) < size:
        listed = ", ".join(sorted(others)) or "none"
        raise FailedPrecondition(
            f"draining {node} would leave {len(others)} agent(s) to hold fragments ({listed}); a protection group needs "
            f"{size} (k={k}, m={m}), so ranks could no longer be protected. Add agents, or undo another drain first"
        )


def drain_progress(
    node: str,
    *,
    alive: bool,
    draining: bool,
    not_applied: str,
    held: tuple[Held, ...],
    generations: Mapping[str, int],
    progress: Mapping[str, Mapping[int, RankProgress]],
    keeps: Mapping[str, int],
) -> DrainProgress:
    """How far the drain of `node` is, from what it holds and the coordinator's last look.

    Args:
        not_applied: why the drain is not in force yet ("" when the groups exclude the node as
            a holder and the last protection refresh counted without it): a drain just asked
            for is not judged on counts made before it.
        held: the node's inventory.
        generations: each job's current generation.
        progress: job -> rank -> its steps, complete counting non-draining holders only.
        keeps: job -> its kept step (protected for every rank without draining holders).
    """
    sets = [h for h in held if h.fragment_indices]
    owned = sorted({(h.job, h.rank) for h in held if not h.fragment_indices and h.generation == generations.get(h.job)})
    protected = [(job, rank) for job, rank in owned if progress.get(job, {}).get(rank, RankProgress()).complete]
    jobs_without_keep = sorted({job for job, _ in owned if keeps.get(job, NONE) < 0})
    status = DrainProgress(
        node=node,
        alive=alive,
        draining=draining,
        drained=False,
        fragment_sets_held=len(sets),
        ranks_owned=len(owned),
        ranks_protected=len(protected),
        reason="",
    )
    if not alive:
        return replace(status, reason=f"{node} has failed: nothing on it can be moved any more")
    if not draining:
        return replace(status, reason=f"{node} is not being drained")
    waits = []
    if not_applied:
        waits.append(not_applied)
    if sets:
        named = ", ".join(f"job {h.job!r} rank {h.rank} step {h.step}" for h in sorted(sets, key=_order)[:EXAMPLES])
        waits.append(
            f"{len(sets)} fragment set(s) of other nodes' ranks still held ({named}); each goes once its "
            "job's kept step is protected without it"
        )
    if missing := [key for key in owned if key not in protected]:
        named = ", ".join(f"job {job!r} rank {rank}" for job, rank in missing[:EXAMPLES])
        waits.append(f"{len(missing)} of its {len(owned)} rank(s) not yet protected by other agents ({named})")
    elif jobs_without_keep:
        waits.append(f"no step protected for every rank without it yet in job(s) {', '.join(map(repr, jobs_without_keep))}")
    if waits:
        return replace(status, reason="; ".join(waits))
    return replace(status, drained=True, reason=f"{node} is drained: it holds nothing others need; it can be stopped")


def _order(h: Held) -> tuple[str, int, int]:
    return (h.job, h.rank, h.step)
