"""The coordinator's whole state, as plain data: agents, groups, jobs, generations, plans.

Pure logic over an injected `now`. The state is soft: it is rebuilt from agents'
registrations and heartbeats (what each holds), so a restarted coordinator loses nothing
that matters. Plans are pinned per (job, generation) so every rank restores the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import groupby
from operator import itemgetter
from typing import NamedTuple

from memckpt.coordinator.drain import DrainProgress, check_can_drain, drain_progress
from memckpt.coordinator.groups import Groups, build_groups
from memckpt.coordinator.membership import AgentInfo, Change, Member, Membership
from memckpt.coordinator.plan import Decision, RankSource, compute_recovery_plan, restorable_steps, source_of
from memckpt.coordinator.protection import NONE, JobPace, JobProtection, RankProgress, job_protection
from memckpt.errors import FailedPrecondition, InvalidRequest, NotFound, StaleGeneration
from memckpt.names import check_name

log = logging.getLogger(__name__)
TARGET_PATIENCE = 3  # refreshes a target may look unprotectable before a new one replaces it
_JOB_RANK = itemgetter(0, 1)  # of a Held
_GENERATION = itemgetter(3)
_NO_STEPS: frozenset[int] = frozenset()
REFRESH_RANKS_PER_STEP = 500  # ranks a refresh recomputes between two yields (a few ms)


class Held(NamedTuple):
    """One snapshot an agent holds: a whole copy (no fragment indices) or some fragments.
    A named tuple: the coordinator builds tens of thousands a second from heartbeats, and a
    tuple is built in half the time of a frozen dataclass."""

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
    released_generation: int = 0  # `memckpt release`: agents drop this generation and older; never restored from

    @property
    def released(self) -> bool:
        return self.released_generation >= self.generation


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
    _held: dict[str, tuple[Held, ...]] = field(default_factory=dict, init=False, repr=False)
    _jobs: dict[str, JobRecord] = field(default_factory=dict, init=False, repr=False)
    # node -> (job, rank) -> its entries of that rank: what a heartbeat compares its report with
    _by_node: dict[str, dict[tuple[str, int], tuple[Held, ...]]] = field(default_factory=dict, init=False, repr=False)
    pinned: dict[tuple[str, int], Decision] = field(default_factory=dict)
    memory_used: dict[str, int] = field(default_factory=dict)
    # job -> rank -> node -> what that node holds of the rank: a heartbeat touches only its own
    # entries, and a rank's or a job's inventory never scans the whole cluster
    _index: dict[str, dict[int, dict[str, tuple[Held, ...]]]] = field(default_factory=dict, init=False, repr=False)
    _groups: Groups | None = field(default=None, init=False, repr=False)  # None: rebuilt when next asked
    _group_infos: dict[int, list[AgentInfo]] = field(default_factory=dict, init=False, repr=False)
    _protection: dict[str, JobProtection] = field(default_factory=dict, init=False, repr=False)  # job -> latest
    _paces: dict[str, JobPace] = field(default_factory=dict, init=False, repr=False)  # job -> how fast it commits
    _strikes: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # job -> refreshes in a row lost
    _refreshed_at: float | None = field(default=None, init=False, repr=False)
    _refresh_s: float = field(default=0.0, init=False, repr=False)  # the time between refreshes, smoothed
    # job -> rank -> its progress in the job's current generation, recomputed only for the ranks
    # whose entries changed (`_dirty`), or for whole jobs after a membership or generation change
    _progress: dict[str, dict[int, RankProgress]] = field(default_factory=dict, init=False, repr=False)
    _dirty: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False)
    _dirty_jobs: set[str] = field(default_factory=set, init=False, repr=False)
    # the draining nodes whose fragments the last protection refresh left out (None: no refresh yet)
    _refreshed_draining: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.membership = Membership(lease_s=self.lease_s)

    @property
    def held(self) -> dict[str, tuple[Held, ...]]:
        """node -> everything it reported holding (live or not)."""
        return self._held

    @property
    def jobs(self) -> dict[str, JobRecord]:
        """Jobs and their generations, started here or learned from what agents hold."""
        return self._jobs

    @property
    def groups(self) -> Groups:
        """The protection groups of the live agents, rebuilt once after membership changed (not
        once per registration: a restarted coordinator sees thousands of them at once)."""
        if self._groups is None:
            self._groups = build_groups(self.membership.alive(), self.k, self.m, self.membership.draining_nodes())
            self._group_infos = {}
        return self._groups

    def register_agent(self, info: AgentInfo, held: tuple[Held, ...], now: float, instance: int = 0) -> tuple[int, Change]:
        member, change = self.membership.register(info, now, instance)
        self._set_held(info.node, held)
        if change.changed:
            self._regroup()
        return member.incarnation, change

    def heartbeat(self, node: str, incarnation: int, held: tuple[Held, ...], now: float, memory_used_bytes: int = 0) -> bool:
        """Renews the lease and files the inventory (`renew`, then `file_inventory`)."""
        return self.renew(node, incarnation, now) and self.file_inventory(node, incarnation, held, memory_used_bytes)

    def renew(self, node: str, incarnation: int, now: float) -> bool:
        """Renews a live member's lease; False tells the agent to register again."""
        return self.membership.heartbeat(node, incarnation, now)

    def file_inventory(self, node: str, incarnation: int, held: tuple[Held, ...], memory_used_bytes: int = 0) -> bool:
        """Files what a live member reported holding: only the ranks whose entries changed since
        its last report are indexed again (a rank's entries are compared, in C). A report
        of another incarnation (made before the agent registered again) or of a failed member
        is dropped: False."""
        member = self.membership.members.get(node)
        if member is None or not member.alive or member.incarnation != incarnation:
            return False
        self._set_held(node, held)
        self.memory_used[node] = memory_used_bytes
        return True

    def tick(self, now: float) -> Change:
        """Fails agents whose lease ran out and rebuilds the groups if anything changed."""
        change = self.membership.expire(now)
        if change.changed:
            self._regroup()
        return change

    def drain(self, node: str) -> bool:
        """Starts draining a live node; True when it was draining already. Raises NotFound for a
        node never registered, FailedPrecondition for a failed one or when the other agents
        could not form a protection group without it."""
        member = self._member(node)
        if not member.alive:
            raise FailedPrecondition(
                f"{node} has failed (its lease ran out): nothing on it can be moved; "
                "its ranks restore from their peers' fragments"
            )
        if member.draining:
            return True
        draining = self.membership.draining_nodes()
        check_can_drain(node, [n for n in self.membership.alive_nodes() if n != node and n not in draining], self.k, self.m)
        self.membership.set_draining(node, True)
        self._regroup()
        return False

    def undo_drain(self, node: str) -> None:
        """Ends the drain of a node: it holds fragments for others again."""
        if not self._member(node).draining:
            raise FailedPrecondition(f"{node} is not being drained: there is nothing to undo")
        self.membership.set_draining(node, False)
        self._regroup()

    @property
    def announced_draining(self) -> frozenset[str]:
        """The draining nodes heartbeat replies name: those the last protection refresh counted
        without. A node must not hear that it drains with a kept step counted with its own
        fragments: it would drop them before their owners protected their steps elsewhere."""
        draining, refreshed = self.groups.draining, self._refreshed_draining
        return draining & refreshed if refreshed is not None else frozenset()

    def drain_status(self, node: str) -> DrainProgress:
        """How far the drain of `node` is, as of the last protection refresh (see `drain.py`)."""
        member = self._member(node)
        generations = {job: record.generation for job, record in self._jobs.items()}
        not_applied = ""
        if node not in self.groups.draining:
            k, m = self.k, self.m
            others = len(self.membership.alive_nodes() - self.membership.draining_nodes())
            not_applied = f"the drain is suspended: {others} other agents, a protection group needs {k + m + 1} (k={k}, m={m})"
        elif node not in self.announced_draining:
            not_applied = "the drain is not in force yet: the coordinator's next look counts without it"
        return drain_progress(
            node,
            alive=member.alive,
            draining=member.draining,
            not_applied=not_applied,
            held=self._held.get(node, ()),
            generations=generations,
            progress=self._progress,
            keeps={job: p.keep for job, p in self._protection.items() if p.generation == generations.get(job)},
        )

    def _member(self, node: str) -> Member:
        check_name(node, "node")
        member = self.membership.members.get(node)
        if member is None:
            known = sorted(self.membership.members)
            listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
            raise NotFound(f"no agent named {node!r} has registered with this coordinator (known: {listed or 'none'})")
        return member

    def group_of(self, node: str) -> list[AgentInfo]:
        groups = self.groups
        position = groups.position_of(node)
        if position < 0:
            return []
        infos = self._group_infos.get(position)
        if infos is None:
            members = {n: m.info for n in groups.groups[position] if (m := self.membership.members.get(n)) and m.alive}
            infos = self._group_infos[position] = list(members.values())
        return list(infos)

    def release_job(self, job: str) -> tuple[int, int]:
        """Releases a finished job: from the next refresh every live agent that holds some of it
        is told to drop its slots and fragments of the current generation and older. Returns
        (that generation, the live nodes holding some of it now). The job leaves the status;
        a later start is a new generation, protected afresh."""
        check_name(job, "job")
        record = self._jobs.get(job)
        if record is None:
            raise NotFound(f"job {job!r} is not known to the coordinator")
        if record.released:
            raise NotFound(f"job {job!r} was released already (generation {record.generation})")
        record.released_generation = record.generation
        self._dirty_jobs.add(job)
        return record.generation, len(self._nodes_holding(job))

    def _nodes_holding(self, job: str) -> set[str]:
        alive = self.membership.alive_nodes()
        return {node for by_node in self._index.get(job, {}).values() for node in by_node if node in alive}

    def start_generation(self, job: str, world_size: int, previous: int) -> int:
        """A new generation for a (re)started job; older generations are fenced from now on."""
        check_name(job, "job")
        if world_size <= 0:
            raise InvalidRequest(f"job {job!r}: world size must be positive, got {world_size}")
        record = self.jobs.get(job)
        if record is not None and previous < record.generation - 1:
            raise StaleGeneration(f"job {job!r}: caller ran in generation {previous}, the job is at {record.generation}")
        generation = max(record.generation if record else 0, previous) + 1
        released = record.released_generation if record else 0
        self.jobs[job] = JobRecord(world_size=world_size, generation=generation, released_generation=released)
        self._dirty_jobs.add(job)
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
            alive = self.membership.alive_nodes()
            ranks = self._index.get(job, {})
            self.pinned[key] = compute_recovery_plan(ranks, record.world_size, alive, record.released_generation)
        return self.pinned[key]

    def _released_generation(self, job: str) -> int:
        """Generations up to this one of the job were released: what agents still hold of them is never restored."""
        record = self._jobs.get(job)
        return record.released_generation if record is not None else 0

    def locate(self, job: str, rank: int) -> tuple[list[tuple[int, RankSource]], str]:
        """Every step of a rank restorable from live agents, newest first, with its sources;
        and, when there is none although the rank had snapshots, why (which nodes held them)."""
        alive = self.membership.alive_nodes()
        by_node = self._index.get(job, {}).get(rank, {})
        released = self._released_generation(job)
        steps = sorted(restorable_steps(by_node, alive, released), reverse=True)
        found = [(step, source_of(rank, by_node, step, alive, released)) for step in steps]
        holders = {node for node, entries in by_node.items() if any(h.generation > released for h in entries)}
        lost = ""
        if not found and holders:
            dead = sorted(holders - alive)
            lost = f"job {job!r} rank {rank}: its snapshots were on {sorted(holders)}, of which {dead} failed; too few remain"
        return found, lost

    def rank_steps(self, job: str) -> dict[int, RankSteps]:
        """Newest committed and protected step per rank, from live agents' whole copies."""
        alive = self.membership.alive_nodes()
        steps: dict[int, RankSteps] = {}
        for rank, by_node in self._index.get(job, {}).items():
            committed = protected = -1
            for node, entries in by_node.items():
                if node not in alive:
                    continue
                for h in entries:
                    if not h.fragment_indices:
                        committed = max(committed, h.step)
                        protected = max(protected, h.step if h.protected else -1)
            if committed >= 0:
                steps[rank] = RankSteps(committed=committed, protected=protected)
        return steps

    def refresh_protection(self, now: float | None = None) -> dict[str, JobProtection]:
        """Recomputes every job's protection target and kept step (see `protection.py`) from
        live agents' inventories; heartbeat replies carry the result until the next refresh.
        `now` (monotonic seconds; the clock's by default) times each job's pace."""
        for _ in self.refresh_protection_in_steps(now=now):
            pass
        return self._protection

    @property
    def protection(self) -> dict[str, JobProtection]:
        """job -> its protection, as of the last refresh."""
        return self._protection

    def refresh_protection_in_steps(
        self, ranks_per_step: int = REFRESH_RANKS_PER_STEP, now: float | None = None
    ) -> Iterator[int]:
        """`refresh_protection` cut in steps: yields (the ranks recomputed so far) after every
        `ranks_per_step` ranks and after the last, so that a server answers calls in between;
        the state may change there (even before the jobs' targets are computed from the ranks),
        and what changed is seen by the next refresh. Only the ranks whose entries changed are
        recomputed."""
        now = time.monotonic() if now is None else now
        if self._refreshed_at is not None and now > self._refreshed_at:
            gap = now - self._refreshed_at
            self._refresh_s = gap if self._refresh_s == 0.0 else (3 * self._refresh_s + gap) / 4
        self._refreshed_at = now
        for job in self._dirty_jobs:
            self._dirty.update((job, rank) for rank in self._index.get(job, {}).keys() | self._progress.get(job, {}).keys())
        self._dirty_jobs = set()
        generations = {job: record.generation for job, record in self._jobs.items()}
        draining = self.groups.draining
        dirty = list(self._dirty)
        for start in range(0, len(dirty), ranks_per_step):
            chunk = dirty[start : start + ranks_per_step]
            self._dirty.difference_update(chunk)  # changed again from here on: recomputed again by the next refresh
            alive, holders = self.membership.alive_nodes(), self._holder_nodes()
            for job, rank in chunk:
                self._recompute_progress(job, rank, generations.get(job), alive, holders)
            yield start + len(chunk)
        result: dict[str, JobProtection] = {}
        for job, ranks in self._progress.items():
            record = self._jobs.get(job)
            if record is None:
                continue
            if record.generation != generations.get(job):  # a new generation began meanwhile: next time
                if (previous := self._protection.get(job)) is not None:
                    result[job] = previous
                continue
            if record.released:  # told while live agents still hold some of it
                if self._nodes_holding(job):
                    result[job] = JobProtection(generation=record.generation, released=True)
                continue
            result[job] = self._job_protection(job, record, ranks, now)
        self._protection = result
        self._refreshed_draining = draining

    def _holder_nodes(self) -> frozenset[str]:
        """Live nodes whose fragments count for protection: a draining node's are on their way out."""
        alive, draining = self.membership.alive_nodes(), self.groups.draining
        return alive - draining if draining else alive

    def _recompute_progress(
        self, job: str, rank: int, generation: int | None, alive: frozenset[str], holders: frozenset[str]
    ) -> None:
        by_node = by_rank.get(rank) if (by_rank := self._index.get(job)) is not None else None
        if generation is None or not by_node:
            if (progress := self._progress.get(job)) is not None:
                progress.pop(rank, None)
            return
        committed: set[int] = set()
        indices: dict[int, set[int]] = {}
        width = 0
        for node, entries in by_node.items():
            if node not in alive:
                continue
            counts = node in holders
            for h in entries:
                if h.generation != generation:
                    continue
                if not h.fragment_indices:
                    committed.add(h.step)
                elif not counts:
                    continue
                elif (found := indices.get(h.step)) is None:
                    indices[h.step] = set(h.fragment_indices)
                    width = h.k + h.m
                else:
                    found.update(h.fragment_indices)
                    width = h.k + h.m
        complete = frozenset(step for step, found in indices.items() if len(found) >= width) if width else _NO_STEPS
        if (progress := self._progress.get(job)) is None:
            progress = self._progress[job] = {}
        progress[rank] = RankProgress(frozenset(committed), complete)

    def _job_protection(self, job: str, record: JobRecord, ranks: dict[int, RankProgress], now: float) -> JobProtection:
        previous = self._protection.get(job)
        current = previous.target if previous is not None and previous.generation == record.generation else NONE
        newest = max((max(p.committed, default=NONE) for p in ranks.values()), default=NONE)
        # the steps committed while word of a target travels, with margin; 0: the job stands
        # still, and then the target is the newest step every rank holds
        lead = self._paces.setdefault(job, JobPace()).lead(record.generation, newest, now, self._refresh_s)
        decided = job_protection(record.generation, record.world_size, ranks, current, lead)
        if current > decided.keep and decided.target != current:
            # given up as unprotectable: inventories lag (holders report a set after its owner
            # recycled the slot), so only after it has looked so for a few refreshes in a row
            strikes = self._strikes[job] = self._strikes.get(job, 0) + 1
            if strikes < TARGET_PATIENCE:
                return replace(decided, target=current)
            log.info("job=%s: target step %d given up (a rank cannot protect it); next %d", job, current, decided.target)
        self._strikes[job] = 0
        return decided

    def _set_held(self, node: str, held: tuple[Held, ...]) -> None:
        """Replaces what `node` holds in the index, touching only the ranks whose entries changed
        (a rank's entries are compared with those it had, as tuples: in C, a field at a time). A
        restarted coordinator learns jobs and generations from them."""
        self._held[node] = held
        by_key = self._by_node.setdefault(node, {})
        grouped: dict[tuple[str, int], tuple[Held, ...]] = {}
        for key, group in groupby(held, _JOB_RANK):  # an agent reports a rank's entries together, or not
            entries = tuple(group)
            grouped[key] = grouped[key] + entries if key in grouped else entries
        changed = [(key, entries) for key, entries in grouped.items() if by_key.get(key) != entries]
        changed += [(key, ()) for key in by_key.keys() - grouped.keys()]
        if not changed:
            return
        index, dirty = self._index, self._dirty
        learned: dict[str, tuple[int, int]] = {}  # job -> (highest rank, newest generation), of changed ranks
        for key, entries in changed:
            dirty.add(key)
            job, rank = key
            if not entries:
                del by_key[key]
                gone = index[job][rank]
                del gone[node]
                if not gone:
                    del index[job][rank]
                continue
            by_key[key] = entries
            if (by_rank := index.get(job)) is None:
                by_rank = index[job] = {}
            if (by_node := by_rank.get(rank)) is None:
                by_node = by_rank[rank] = {}
            by_node[node] = entries
            generation = max(map(_GENERATION, entries))
            if (seen := learned.get(job)) is None:
                learned[job] = (rank, generation)
            elif rank > seen[0] or generation > seen[1]:
                learned[job] = (max(seen[0], rank), max(seen[1], generation))
        for job, (top_rank, generation) in learned.items():
            record = self._jobs.get(job)
            if record is None:
                self._jobs[job] = JobRecord(world_size=top_rank + 1, generation=generation)
                self._dirty_jobs.add(job)
            else:
                record.world_size = max(record.world_size, top_rank + 1)
                if generation > record.generation:
                    record.generation = generation
                    self._dirty_jobs.add(job)

    def _regroup(self) -> None:
        """Membership changed: groups are rebuilt when next asked, and every rank's progress
        (which counts live holders only) is recomputed by the next refresh."""
        self._groups = None
        self._dirty_jobs.update(self._index)
