"""The recovery plan of a restarted job: one step for every rank, and where each rank gets it.

Pure logic. A rank can restore a step from a whole copy on a live agent (its own slot or a
peer's copy) or from any k of the k+m fragments of that step held by live agents. The plan
takes the newest step that every rank can restore, so all ranks restore the same step; the
coordinator pins it for the job's generation. When no such step exists it says which ranks
are missing and restores nothing (never a partial job).

The functions read what nodes reported holding of a rank as it is kept in the coordinator's
index (node -> its entries of the rank), without building other objects per entry: a plan of
16,000 ranks visits some 100,000 entries, and is asked while the whole job waits for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeAlias


class Entry(Protocol):
    """One snapshot a node holds of a rank: a whole copy (no fragment indices) or some of
    its fragments (the coordinator's `Held`)."""

    @property
    def step(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def fragment_indices(self) -> tuple[int, ...]: ...
    @property
    def k(self) -> int: ...
    @property
    def m(self) -> int: ...
    @property
    def size_bytes(self) -> int: ...


RankHoldings: TypeAlias = Mapping[str, Sequence[Entry]]  # node -> what it holds of one rank


class FragmentSet(NamedTuple):  # named tuples: a plan builds one of each per rank, in a third of a dataclass's time
    step: int
    k: int
    m: int
    size_bytes: int
    holders: tuple[tuple[int, str], ...]  # (fragment index, node)
    generation: int = 0  # the attempt that committed the step


class RankSource(NamedTuple):
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


def restorable_steps(holdings: RankHoldings, alive: frozenset[str], released: int = 0) -> set[int]:
    """The steps a rank can restore from live nodes: a whole copy, or k distinct fragments of
    one commit of the step (a step committed by two attempts is two fragment sets: their
    fragments never mix). Entries of generations up to `released` do not count."""
    steps: set[int] = set()
    fragments: dict[tuple[int, int], tuple[int, set[int]]] = {}  # (step, generation) -> (k, indices)
    for node, entries in holdings.items():
        if node not in alive:
            continue
        for e in entries:
            if e.generation <= released:
                continue
            if not e.fragment_indices:
                steps.add(e.step)
            elif (found := fragments.get((e.step, e.generation))) is None:
                fragments[(e.step, e.generation)] = (e.k, set(e.fragment_indices))
            else:
                found[1].update(e.fragment_indices)
    steps.update(step for (step, _), (k, indices) in fragments.items() if len(indices) >= k)
    return steps


def source_of(rank: int, holdings: RankHoldings, step: int, alive: frozenset[str], released: int = 0) -> RankSource:
    """Where `rank` can get `step`: live whole copies, and the live holders of the step's
    fragments if they are enough (of the newest attempt that committed it, if several did)."""
    copies: list[str] = []
    commits: dict[int, tuple[Entry, dict[int, str]]] = {}  # generation -> (an entry, index -> node)
    for node, entries in holdings.items():
        if node not in alive:
            continue
        for e in entries:
            if e.step != step or e.generation <= released:
                continue
            if not e.fragment_indices:
                copies.append(node)
            elif (found := commits.get(e.generation)) is None:
                commits[e.generation] = (e, dict.fromkeys(e.fragment_indices, node))
            else:
                holders = found[1]
                for index in e.fragment_indices:
                    if index not in holders:
                        holders[index] = node
    fragments = None
    usable = [generation for generation, (e, holders) in commits.items() if len(holders) >= e.k]
    if usable:
        scheme, holders = commits[max(usable)]
        fragments = FragmentSet(
            step=step,
            generation=scheme.generation,
            k=scheme.k,
            m=scheme.m,
            size_bytes=scheme.size_bytes,
            holders=tuple(sorted(holders.items())),
        )
    return RankSource(rank=rank, copies=tuple(sorted(copies)), fragments=fragments)


def compute_recovery_plan(
    ranks: Mapping[int, RankHoldings], world_size: int, alive: Iterable[str], released: int = 0
) -> Decision:
    """The newest step every rank of the job can restore from live agents, with each rank's
    sources. `ranks`: rank -> what nodes hold of it; `released`: see `restorable_steps`."""
    live = frozenset(alive)
    common: set[int] | None = None  # the steps every rank so far can restore
    missing: list[int] = []
    for rank in range(world_size):  # each rank's steps dropped at once: nothing piles up for the collector
        steps = restorable_steps(ranks.get(rank, {}), live, released)
        if not steps:
            missing.append(rank)
        elif common is None:
            common = steps
        else:
            common &= steps
    if common is None:
        return Decision(plan=None, reason="no rank has a snapshot on a live agent: a fresh start")
    if missing or not common:
        detail = f"ranks {missing} have nothing on live agents" if missing else "no step is held for every rank"
        return Decision(plan=None, reason=f"memory cannot restore the job: {detail}")
    step = max(common)
    sources = tuple(source_of(rank, ranks.get(rank, {}), step, live, released) for rank in range(world_size))
    return Decision(plan=RecoveryPlan(step=step, sources=sources), reason=f"step {step} is the newest every rank can restore")
