"""The recovery plan of a restarted job: one step for every rank, and where each rank gets it.

Pure logic. A rank can restore a step from a whole copy on a live agent (its own slot or a
peer's copy) or from any k of the k+m fragments of that step held by live agents. The plan
takes the newest step that every rank can restore, so all ranks restore the same step; the
coordinator pins it for the job's generation. When no such step exists it says which ranks
are missing and restores nothing (never a partial job).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class WholeCopy:
    node: str
    step: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FragmentSet:
    step: int
    k: int
    m: int
    size_bytes: int
    holders: tuple[tuple[int, str], ...]  # (fragment index, node)
    generation: int = 0  # the attempt that committed the step


@dataclass(frozen=True, slots=True, kw_only=True)
class RankInventory:
    """What the cluster holds of one rank of one job."""

    copies: tuple[WholeCopy, ...] = ()
    fragments: tuple[FragmentSet, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RankSource:
    rank: int
    copies: tuple[str, ...]  # nodes with a whole copy of the step, preferred in this order
    fragments: FragmentSet | None  # live holders of the step's fragments, if enough


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryPlan:
    step: int
    sources: tuple[RankSource, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    plan: RecoveryPlan | None
    reason: str


def restorable_steps(inventory: RankInventory, alive: frozenset[str]) -> set[int]:
    steps = {c.step for c in inventory.copies if c.node in alive}
    steps |= {f.step for f in inventory.fragments if _live_holders(f, alive) >= f.k}
    return steps


def compute_recovery_plan(inventories: Mapping[int, RankInventory], world_size: int, alive: Iterable[str]) -> Decision:
    """The newest step every rank of the job can restore from live agents, with each rank's sources."""
    live = frozenset(alive)
    per_rank = {rank: restorable_steps(inventories.get(rank, RankInventory()), live) for rank in range(world_size)}
    if all(not steps for steps in per_rank.values()):
        return Decision(plan=None, reason="no rank has a snapshot on a live agent: a fresh start")
    missing = sorted(rank for rank, steps in per_rank.items() if not steps)
    common = set.intersection(*per_rank.values())
    if not common:
        detail = f"ranks {missing} have nothing on live agents" if missing else "no step is held for every rank"
        return Decision(plan=None, reason=f"memory cannot restore the job: {detail}")
    step = max(common)
    sources = tuple(source_of(rank, inventories.get(rank, RankInventory()), step, live) for rank in range(world_size))
    return Decision(plan=RecoveryPlan(step=step, sources=sources), reason=f"step {step} is the newest every rank can restore")


def _live_holders(fragments: FragmentSet, alive: frozenset[str]) -> int:
    return len({index for index, node in fragments.holders if node in alive})


def source_of(rank: int, inventory: RankInventory, step: int, alive: frozenset[str]) -> RankSource:
    """Where `rank` can get `step`: live whole copies, and the step's fragments if enough are live."""
    copies = tuple(sorted(c.node for c in inventory.copies if c.step == step and c.node in alive))
    usable = [f for f in inventory.fragments if f.step == step and _live_holders(f, alive) >= f.k]
    fragments = None
    if usable:
        chosen = max(usable, key=lambda f: f.generation)  # the newest attempt's commit of the step
        fragments = FragmentSet(
            step=step,
            generation=chosen.generation,
            k=chosen.k,
            m=chosen.m,
            size_bytes=chosen.size_bytes,
            holders=tuple((i, n) for i, n in chosen.holders if n in alive),
        )
    return RankSource(rank=rank, copies=copies, fragments=fragments)
