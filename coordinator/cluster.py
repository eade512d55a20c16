"""The coordinator's whole state, as plain data: agents, groups, jobs, generations, plans.

Pure logic over an injected `now`. The state is soft: it is rebuilt from agents'
registrations and heartbeats (what each holds), so a restarted coordinator loses nothing
that matters. Plans are pinned per (job, generation) so every rank restores the same step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from memckpt.coordinator.groups import Groups, build_groups
from memckpt.coordinator.membership import AgentInfo, Change, Membership
from memckpt.coordinator.plan import (
    Decision,
    FragmentSet,
    RankInventory,
    RankSource,
    WholeCopy,
    compute_recovery_plan,
    restorable_steps,
    source_of,
)
from memckpt.errors import InvalidRequest, NotFound, StaleGeneration
from memckpt.names import check_name


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """One snapshot an agent holds: a whole copy (no fragment indices) or some fragments."""

    job: str
    rank: int
    step: int
    generation: int
    fragment_indices: tuple[int, ...] = ()
    k: int = 0
    m: int = 0
    size_bytes: int = 0
    protected: bool = False


@dataclass(slots=True, kw_only=True)
class JobRecord:
    world_size: int
    generation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RankSteps:
    committed: int
    protected: int


@dataclass(slots=True, kw_only=True)
class Cluster:
    k: int
    m: int
    lease_s: float
    membership: Membership = field(init=False)
    groups: Groups = field(init=False)
    held: dict[str, tuple[Held, ...]] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    pinned: dict[tuple[str, int], Decision] = field(default_factory=dict)
    memory_used: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.membership = Membership(lease_s=self.lease_s)
        self.groups = build_groups([], self.k, self.m)

    def register_agent(self, info: AgentInfo, held: tuple[Held, ...], now: float) -> tuple[int, Change]:
        member, change = self.membership.register(info, now)
        self.held[info.node] = held
        self._learn_jobs(held)
        if change.changed:
            self._regroup()
        return member.incarnation, change

    def heartbeat(self, node: str, incarnation: int, held: tuple[Held, ...], now: float, memory_used_bytes: int = 0) -> bool:
        if not self.membership.heartbeat(node, incarnation, now):
            return False
        self.held[node] = held
        self.memory_used[node] = memory_used_bytes
        self._learn_jobs(held)
        return True

    def tick(self, now: float) -> Change:
        """Fails agents whose lease ran out and rebuilds the groups if anything changed."""
        change = self.membership.expire(now)
        if change.changed:
            self._regroup()
        return change

    def group_of(self, node: str) -> list[AgentInfo]:
        members = self.groups.group_of(node) or ()
        infos = {i.node: i for i in self.membership.alive()}
        return [infos[n] for n in members if n in infos]

    def start_generation(self, job: str, world_size: int, previous: int) -> int:
        """A new generation for a (re)started job; older generations are fenced from now on."""
        check_name(job, "job")
        if world_size <= 0:
            raise InvalidRequest(f"job {job!r}: world size must be positive, got {world_size}")
        record = self.jobs.get(job)
        if record is not None and previous < record.generation - 1:
            raise StaleGeneration(f"job {job!r}: caller ran in generation {previous}, the job is at {record.generation}")
        generation = max(record.generation if record else 0, previous) + 1
        self.jobs[job] = JobRecord(world_size=world_size, generation=generation)
        return generation

    def check_generation(self, job: str, generation: int) -> None:
        record = self.jobs.get(job)
        if record is not None and generation < record.generation:
            raise StaleGeneration(f"job {job!r}: generation {generation} is older than the current {record.generation}")

    def recovery_plan(self, job: str, generation: int) -> Decision:
        """The pinned plan of (job, generation); computed on first ask."""
        record = self.jobs.get(job)
        if record is None:
            raise NotFound(f"job {job!r} has not started a generation")
        if generation != record.generation:
            raise StaleGeneration(f"job {job!r}: plan asked for generation {generation}, current is {record.generation}")
        key = (job, generation)
        if key not in self.pinned:
            alive = [a.node for a in self.membership.alive()]
            self.pinned[key] = compute_recovery_plan(self.inventories(job), record.world_size, alive)
        return self.pinned[key]

    def inventories(self, job: str) -> dict[int, RankInventory]:
        copies: dict[int, list[WholeCopy]] = defaultdict(list)
        # a step committed by two attempts is two fragment sets: their fragments never mix
        fragments: dict[tuple[int, int, int], dict[int, str]] = defaultdict(dict)
        schemes: dict[tuple[int, int, int], Held] = {}
        for node, entries in self.held.items():
            for h in entries:
                if h.job != job:
                    continue
                if not h.fragment_indices:
                    copies[h.rank].append(WholeCopy(node=node, step=h.step))
                    continue
                for index in h.fragment_indices:
                    fragments[(h.rank, h.step, h.generation)][index] = node
                schemes[(h.rank, h.step, h.generation)] = h
        ranks = set(copies) | {rank for rank, _, _ in fragments}
        result = {}
        for rank in ranks:
            sets = tuple(
                FragmentSet(
                    step=step,
                    generation=generation,
                    k=schemes[(r, step, generation)].k,
                    m=schemes[(r, step, generation)].m,
                    size_bytes=schemes[(r, step, generation)].size_bytes,
                    holders=tuple(sorted(holders.items())),
                )
                for (r, step, generation), holders in fragments.items()
                if r == rank
            )
            result[rank] = RankInventory(copies=tuple(copies[rank]), fragments=sets)
        return result

    def locate(self, job: str, rank: int) -> tuple[list[tuple[int, RankSource]], str]:
        """Every step of a rank restorable from live agents, newest first, with its sources;
        and, when there is none although the rank had snapshots, why (which nodes held them)."""
        alive = frozenset(a.node for a in self.membership.alive())
        inventory = self.inventories(job).get(rank, RankInventory())
        steps = sorted(restorable_steps(inventory, alive), reverse=True)
        found = [(step, source_of(rank, inventory, step, alive)) for step in steps]
        holders = {c.node for c in inventory.copies} | {n for f in inventory.fragments for _, n in f.holders}
        lost = ""
        if not found and holders:
            dead = sorted(holders - alive)
            lost = f"job {job!r} rank {rank}: its snapshots were on {sorted(holders)}, of which {dead} failed; too few remain"
        return found, lost

    def rank_steps(self, job: str) -> dict[int, RankSteps]:
        """Newest committed and protected step per rank, from live agents' whole copies."""
        alive = {a.node for a in self.membership.alive()}
        steps: dict[int, RankSteps] = {}
        for node, entries in self.held.items():
            if node not in alive:
                continue
            for h in entries:
                if h.job != job or h.fragment_indices:
                    continue
                old = steps.get(h.rank, RankSteps(committed=-1, protected=-1))
                steps[h.rank] = RankSteps(
                    committed=max(old.committed, h.step), protected=max(old.protected, h.step if h.protected else -1)
                )
        return steps

    def _learn_jobs(self, held: tuple[Held, ...]) -> None:
        """A restarted coordinator learns jobs and generations from what agents hold."""
        for h in held:
            record = self.jobs.get(h.job)
            if record is None:
                self.jobs[h.job] = JobRecord(world_size=h.rank + 1, generation=h.generation)
            else:
                record.world_size = max(record.world_size, h.rank + 1)
                record.generation = max(record.generation, h.generation)

    def _regroup(self) -> None:
        self.groups = build_groups(self.membership.alive(), self.k, self.m)
