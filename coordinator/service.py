"""CoordinatorService over gRPC (asyncio): a thin, locked layer over `Cluster`.

The methods run on the server's event loop, one at a time, so thousands of agents'
heartbeats cost no thread hand-offs and no lock convoys; a heartbeat renews the lease and
is answered at once. What the heartbeats report (inventories) is filed, and the protection
targets recomputed, by a refresh on the loop too: cut in steps of a few milliseconds, and
paced so that it takes at most a share of the loop's time (`STATE_WORK_SHARE`) whatever the
cluster's size: heartbeats never wait behind it for long, and a cluster too large for one
refresh a second is refreshed less often (each node's newest report filed once) instead of
answering late. Leases expire on their own cadence (`expire_leases`). The lock still guards each step.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from memckpt.coordinator import metrics, wire
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.groups import Groups
from memckpt.coordinator.membership import AgentInfo, Change
from memckpt.coordinator.plan import Decision
from memckpt.coordinator.protection import JobProtection
from memckpt.errors import InvalidRequest, MemckptError, Unavailable
from memckpt.names import check_name
from memckpt.protos import coordinator_pb2 as pb
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.rpc import STATUS

log = logging.getLogger(__name__)

R = TypeVar("R")
FILE_NODES_PER_STEP = 50  # heartbeats' inventories filed between two yields to the event loop (a few ms)
# How long a slice of a refresh rests at least. Not 0: grpc.aio's I/O completes on its
# poller thread and reaches the loop only while the loop waits in select(); a loop that only
# ever yields with sleep(0) never waits, and every call's reply stalled for the whole refresh
# (bench/coordinator_scale.py, 2,000 agents: heartbeat p99 513 ms with sleep(0), 32 ms with this).
YIELD_S = 0.002
# Up to this many agents a heartbeat's inventory is filed as it comes (well under a millisecond
# each, and protection targets follow the newest steps of fast jobs); beyond, by the next refresh
# (or a read), which lags what the coordinator knows but keeps heartbeats answered at once.
FILE_INLINE_MAX_AGENTS = 64
# The largest share of the event loop's time a refresh (filing inventories, recomputing
# protection) takes: after each step it rests in proportion, so heartbeats are answered in the
# rest. A refresh of a small cluster takes milliseconds and never rests long; one of 2,000
# busy agents took 0.9 s of CPU on a slow 2-core VM, and unpaced it starved the heartbeats (p50 0.8 s).
STATE_WORK_SHARE = 0.25
Report = pb.HeartbeatRequest | bytes  # a heartbeat's report: parsed, or as it came (parsed when filed)
GroupView = tuple[Groups, frozenset[str]]  # the groups, and the draining members heartbeats name
Method = Callable[[Any, Any, Any], Awaitable[R]]
StreamMethod = Callable[[Any, Any, Any], AsyncIterator[R]]


def map_errors(method: Method[R]) -> Method[R]:
    """`memckpt.rpc.map_errors` for asyncio servicers: a memckpt error ends the call with its
    status; anything else is INTERNAL and logged."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> R:
        try:
            return await method(self, request, context)
        except Exception as exc:  # the servicer must answer, never hang up silently
            await _abort(method.__name__, exc, context)
            raise  # abort raised already; this line is never reached

    return wrapper


def map_stream_errors(method: StreamMethod[R]) -> StreamMethod[R]:
    """`map_errors` for methods that answer with a stream: an error ends the stream with its status."""

    @functools.wraps(method)
    async def wrapper(self: Any, requests: Any, context: Any) -> AsyncIterator[R]:
        try:
            async for reply in method(self, requests, context):
                yield reply
        except Exception as exc:  # the servicer must answer, never hang up silently
            await _abort(method.__name__, exc, context)
            raise  # abort raised already; this line is never reached

    return wrapper


async def _abort(name: str, exc: Exception, context: Any) -> None:
    if isinstance(exc, MemckptError):
        code = STATUS.get(type(exc), grpc.StatusCode.INTERNAL)
        log.info("rpc=%s status=%s error=%s", name, code.name, exc)
        await context.abort(code, str(exc))
    log.error("rpc=%s failed", name, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, cluster: Cluster, heartbeat_interval_s: float, warmup_s: float | None = None) -> None:
        """`warmup_s` (default: the lease): how long after start plans and locations are refused
        as UNAVAILABLE. The tables are soft state: a restarted coordinator knows what agents hold
        only once they have registered again, and within a lease every live one has; before
        that an empty answer would read as "nothing held" and start a rank fresh."""
        self._cluster = cluster
        self._interval_s = heartbeat_interval_s
        self._started = time.monotonic()
        self._ready_at = self._started + (cluster.lease_s if warmup_s is None else warmup_s)
        self._lock = threading.Lock()
        self._logged_groups: Groups | None = None
        # each group's members as protobuf, for heartbeat replies; dropped when groups (or who drains) change
        self._group_protos: tuple[GroupView | None, dict[tuple[AgentInfo, ...], list[pb.AgentDescription]]] = (None, {})
        self._protection: list[pb.JobProtection] = []  # every job's, for heartbeat replies; rebuilt each refresh
        # node -> its last report filed as it came (from `state.py`'s front end): the same bytes
        # again (an idle node, a stopped job) are filed at the cost of comparing them
        self._filed_raw: dict[str, bytes] = {}
        # node -> (incarnation, request or its encoding) of its newest heartbeat not yet filed:
        # in a large cluster heartbeats are answered at once and their inventories filed by the
        # next refresh, in slices between other calls, so no heartbeat waits behind another's
        # inventory; in a small one (FILE_INLINE_MAX_AGENTS) each is filed as it comes
        self._pending: dict[str, tuple[int, Report]] = {}
        self._drained: dict[str, bool] = {}  # draining node -> whether it was drained at the last refresh (logged on change)
        # id(group's members as protobuf) -> (those members, the protection list, the reply to them)
        self._replies: dict[int, tuple[list[pb.AgentDescription], list[pb.JobProtection], pb.HeartbeatResponse]] = {}
        self._filed_at = -math.inf  # when a read last filed every pending report (monotonic)
        # job -> (its pinned plan, the addresses it was sent with, the reply): every rank of a
        # restarted job may ask, and the reply of 16,000 ranks takes longer to build than to find
        self._plan_replies: dict[str, tuple[Decision, dict[str, str], pb.GetRecoveryPlanResponse]] = {}
        self.metrics_address = ""  # where Prometheus scrapes the coordinator, if it serves metrics

    def tick(self) -> Change:
        """Fails agents whose lease ran out; files the reported inventories and recomputes
        which step each job protects next, all at once (`expire_leases` and `refresh_async`
        on the server's loop)."""
        with self._lock:
            change = self._cluster.tick(time.monotonic())
            self._file(self._take_pending())
            protection = self._cluster.refresh_protection()
        self._publish_change(change)
        self._publish_protection(protection)
        return change

    def expire_leases(self) -> Change:
        """Fails agents whose lease ran out (cheap: renewals are counted as heartbeats come)."""
        with self._lock:
            change = self._cluster.tick(time.monotonic())
        self._publish_change(change)
        return change

    async def refresh_async(self, share: float = STATE_WORK_SHARE) -> float:
        """Files the inventories reported since the last refresh and recomputes the protection
        targets, on the server's event loop: in steps, resting after each so that the refresh
        takes at most `share` of the loop's time. Returns the CPU seconds its steps took."""
        rest = (1 - share) / share
        worked = 0.0

        async def pause(began: float, cpu_began: float) -> None:
            nonlocal worked
            worked += time.thread_time() - cpu_began
            await asyncio.sleep(max(YIELD_S, (time.perf_counter() - began) * rest))

        with self._lock:
            left = len(self._pending)  # the reports of this refresh; later ones wait for the next
        while left > 0:  # taken a slice at a time: a report filed meanwhile (by a plan) is never filed over by an older one
            began, cpu_began = time.perf_counter(), time.thread_time()
            with self._lock:
                self._file(self._take_pending(min(left, FILE_NODES_PER_STEP)))
            left -= FILE_NODES_PER_STEP
            await pause(began, cpu_began)
        steps = self._cluster.refresh_protection_in_steps()
        done = False
        while not done:
            began, cpu_began = time.perf_counter(), time.thread_time()
            with self._lock:
                done = next(steps, None) is None
            await pause(began, cpu_began)
        self._publish_protection(self._cluster.protection)
        return worked

    def _take_pending(self, limit: int | None = None) -> list[tuple[str, tuple[int, Report]]]:
        """Unfiled heartbeats' inventories (the `limit` oldest, or all), each node's newest;
        those that arrive from here on wait for the next filing."""
        if limit is None:
            reports, self._pending = self._pending, {}
            return list(reports.items())
        taken = list(itertools.islice(self._pending.items(), limit))
        for node, _ in taken:
            del self._pending[node]
        return taken

    def _file_pending(self, *, now: float, force: bool = False) -> None:
        """Files the reports not filed yet (the lock held), for a call that reads the index: a
        refresh may be seconds behind in a large cluster, and a plan over reports of different
        ages could find no step common to all ranks of a job that just stopped. Always before a
        plan is pinned (`force`); otherwise at most once a heartbeat interval, so that a storm
        of reads (every rank of a restarted job locating its snapshots, a script polling the
        status) files each node's report no more often than its agent sends one."""
        if force or now - self._filed_at >= self._interval_s:
            self._filed_at = now
            self._file(self._take_pending())

    def _file(self, reports: list[tuple[str, tuple[int, Report]]]) -> None:
        for node, (incarnation, report) in reports:
            raw = report if isinstance(report, bytes) else None
            if raw is not None and self._filed_raw.get(node) == raw:  # node, incarnation, inventory and memory as last filed
                continue
            try:
                if isinstance(report, pb.HeartbeatRequest):
                    held, memory_used = wire.held_from_proto(report.held), report.memory_used_bytes
                else:
                    held, memory_used = wire.decode_report(report)
            except InvalidRequest as exc:  # the front end read only its header; a queued one was answered already
                log.warning("node %s: a heartbeat's report is dropped: %s", node, exc)
                continue
            filed = self._cluster.file_inventory(node, incarnation, held, memory_used)
            if raw is None:
                self._filed_raw.pop(node, None)
            elif filed:
                self._filed_raw[node] = raw

    def _publish_change(self, change: Change) -> None:
        metrics.AGENT_FAILURES.inc(len(change.failed))
        if change.changed:
            log.warning("membership: %s", change.reason)

    def _publish_protection(self, protection: dict[str, JobProtection]) -> None:
        """What heartbeat replies carry from now on; logs the groups once whenever they were
        rebuilt (not once per registration: thousands of agents register at once after a restart)."""
        with self._lock:
            groups = self._cluster.groups
        self._protection = [
            pb.JobProtection(job=job, generation=p.generation, target_step=p.target, keep_step=p.keep, released=p.released)
            for job, p in sorted(protection.items())
        ]
        if groups is not self._logged_groups:
            self._logged_groups = groups
            log.info("groups: %s", groups.reason)
        self._log_drains()

    def _log_drains(self) -> None:
        """Logs each drain that finished (or stopped being finished) since the last refresh."""
        with self._lock:
            members = self._cluster.membership.members
            statuses = [self._cluster.drain_status(n) for n, m in members.items() if m.draining and m.alive]
        drained = {s.node: s.drained for s in statuses}
        for status in statuses:
            if status.drained != self._drained.get(status.node, False):
                if status.drained:
                    log.info("drain of %s finished: %s", status.node, status.reason)
                else:
                    log.warning("drain of %s no longer finished: %s", status.node, status.reason)
        self._drained = drained

    @map_errors
    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Any) -> pb.RegisterAgentResponse:
        info = wire.agent_from_proto(request.agent)
        held = wire.held_from_proto(request.held)
        with self._lock:
            self._pending.pop(info.node, None)  # an older incarnation's
            incarnation, change = self._cluster.register_agent(info, held, time.monotonic(), request.instance_id)
        metrics.AGENT_JOINS.inc(len(change.joined))
        log.info("membership: %s", change.reason)
        for node in change.undrained:
            log.info("drain of %s undone: its agent restarted", node)
        return pb.RegisterAgentResponse(
            incarnation=incarnation, lease_s=self._cluster.lease_s, heartbeat_interval_s=self._interval_s
        )

    @map_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        return self._heartbeat(request)

    @map_stream_errors
    async def StreamHeartbeats(
        self, requests: AsyncIterator[pb.HeartbeatRequest], context: Any
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        """`Heartbeat` over one stream per agent, a reply per request; a bad request ends the stream."""
        async for request in requests:
            yield self._heartbeat(request)

    def _heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        started = time.perf_counter()
        check_name(request.node, "node")
        accepted = self.accept_report(request.node, request.incarnation, request, time.monotonic())
        if accepted:
            with self._lock:
                group = self._group_proto(request.node)
            reply = self._reply(group)
        else:
            reply = pb.HeartbeatResponse(accepted=False, k=self._cluster.k, m=self._cluster.m)
        metrics.HEARTBEATS.inc()
        metrics.HEARTBEAT_SECONDS.observe(time.perf_counter() - started)
        return reply

    def accept_report(self, node: str, incarnation: int, report: Report, now: float) -> bool:
        """A heartbeat of `node` received at `now` (monotonic): renews its lease and keeps its
        report (the request, or its encoding: the front end of `state.py` forwards it unparsed)
        to be filed; False when the node must register again."""
        with self._lock:
            accepted = self._cluster.renew(node, incarnation, now)
            if accepted and len(self._cluster.membership.members) <= FILE_INLINE_MAX_AGENTS:
                self._file([(node, (incarnation, report))])
            elif accepted:
                self._pending[node] = (incarnation, report)
        return accepted

    def heartbeat_view(self) -> tuple[dict[str, tuple[int, int]], list[bytes]]:
        """What a heartbeat of each live node is answered now, for a front end that answers
        them without this state (`state.py`): node -> (its incarnation, the index of its reply),
        and the encoded replies (one per group)."""
        nodes: dict[str, tuple[int, int]] = {}
        replies: list[bytes] = []
        numbered: dict[int, int] = {}  # id(reply) -> its index
        with self._lock:
            for node, member in self._cluster.membership.members.items():
                if not member.alive:
                    continue
                reply = self._reply(self._group_proto(node))
                index = numbered.get(id(reply))
                if index is None:
                    index = numbered[id(reply)] = len(replies)
                    replies.append(reply.SerializeToString())
                nodes[node] = (member.incarnation, index)
        return nodes, replies

    def view_version(self) -> tuple[object, ...]:
        """Changes whenever `heartbeat_view` may: registrations, failures, drains, groups and
        protection targets (compare with `same_version`)."""
        with self._lock:
            cluster = self._cluster
            return (
                cluster.membership.incarnations,
                cluster.membership.alive_nodes(),
                cluster.groups,
                cluster.announced_draining,
                self._protection,
            )

    def _reply(self, group: list[pb.AgentDescription]) -> pb.HeartbeatResponse:
        """An accepted heartbeat's reply: the same for every member of a group until the groups
        or the protection targets change, so built once per group (a reply copies its messages)."""
        key = id(group)
        cached = self._replies.get(key)
        if cached is not None and cached[0] is group and cached[1] is self._protection:
            return cached[2]
        k, m = self._cluster.k, self._cluster.m
        reply = pb.HeartbeatResponse(accepted=True, group=group, k=k, m=m, protection=self._protection)
        if len(self._replies) > 4 * len(self._cluster.membership.members) + 16:  # stale groups' replies
            self._replies.clear()
        self._replies[key] = (group, self._protection, reply)
        return reply

    def _group_proto(self, node: str) -> list[pb.AgentDescription]:
        view = (self._cluster.groups, self._cluster.announced_draining)
        cached_view = self._group_protos[0]
        if cached_view is None or cached_view[0] is not view[0] or cached_view[1] != view[1]:
            self._group_protos = (view, {})
        members = tuple(self._cluster.group_of(node))
        cached = self._group_protos[1].get(members)
        if cached is None:
            draining = view[1]
            cached = self._group_protos[1][members] = [wire.agent_to_proto(i, i.node in draining) for i in members]
        return cached

    @map_errors
    async def DrainAgent(self, request: pb.DrainAgentRequest, context: Any) -> pb.DrainAgentResponse:
        with self._lock:
            if request.undo:
                self._cluster.undo_drain(request.node)
                unchanged = False
            else:
                unchanged = self._cluster.drain(request.node)
            status = self._cluster.drain_status(request.node)
            groups = self._cluster.groups
        if request.undo:
            log.info("drain of %s undone: it holds fragments for others again", request.node)
        elif unchanged:
            log.info("drain of %s asked again: it is draining already", request.node)
        else:
            log.info("drain of %s started: %s", request.node, groups.reason)
        return pb.DrainAgentResponse(status=wire.drain_to_proto(status), unchanged=unchanged)

    @map_errors
    async def GetDrainStatus(self, request: pb.GetDrainStatusRequest, context: Any) -> pb.GetDrainStatusResponse:
        with self._lock:
            status = self._cluster.drain_status(request.node)
        return pb.GetDrainStatusResponse(status=wire.drain_to_proto(status))

    @map_errors
    async def ReleaseJob(self, request: pb.ClusterReleaseJobRequest, context: Any) -> pb.ClusterReleaseJobResponse:
        with self._lock:
            generation, holding = self._cluster.release_job(request.job)
        log.info(
            "job %s released (generation %d and older): %d live agent(s) drop what they hold of it",
            request.job,
            generation,
            holding,
        )
        return pb.ClusterReleaseJobResponse(generation=generation, nodes_holding=holding)

    @map_errors
    async def StartGeneration(self, request: pb.StartGenerationRequest, context: Any) -> pb.StartGenerationResponse:
        with self._lock:
            generation = self._cluster.start_generation(request.job, request.world_size, request.previous_generation)
        metrics.GENERATIONS.inc()
        log.info("job=%s generation=%d world_size=%d", request.job, generation, request.world_size)
        return pb.StartGenerationResponse(generation=generation)

    @map_errors
    async def GetRecoveryPlan(self, request: pb.GetRecoveryPlanRequest, context: Any) -> pb.GetRecoveryPlanResponse:
        check_name(request.job, "job")
        self._check_warm()
        with self._lock:
            self._file_pending(now=time.monotonic(), force=(request.job, request.generation) not in self._cluster.pinned)
            decision = self._cluster.recovery_plan(request.job, request.generation)
            addresses = self._cluster.membership.addresses()  # the same object until membership changes
        metrics.PLANS.labels("memory" if decision.plan is not None else "lost").inc()
        cached = self._plan_replies.get(request.job)
        if cached is not None and cached[0] is decision and cached[1] is addresses:
            return cached[2]
        log.info("plan job=%s generation=%d: %s", request.job, request.generation, decision.reason)
        reply = wire.plan_to_proto(decision, addresses)
        self._plan_replies[request.job] = (decision, addresses, reply)
        return reply

    @map_errors
    async def LocateSnapshots(self, request: pb.LocateSnapshotsRequest, context: Any) -> pb.LocateSnapshotsResponse:
        check_name(request.job, "job")
        self._check_warm()
        with self._lock:
            self._file_pending(now=time.monotonic())
            found, lost = self._cluster.locate(request.job, request.rank)
            addresses = self._cluster.membership.addresses()
        locations = [wire.location_to_proto(step, s, addresses) for step, s in found]
        return pb.LocateSnapshotsResponse(locations=locations, lost_reason=lost)

    @map_errors
    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context: Any) -> pb.GetClusterStatusResponse:
        with self._lock:
            self._file_pending(now=time.monotonic())
            return self._status()

    def _check_warm(self) -> None:
        now = time.monotonic()
        if now < self._ready_at:
            raise Unavailable(
                f"the coordinator started {now - self._started:.1f} s ago and learns what agents hold "
                f"for {self._ready_at - now:.1f} s more (until every live agent has registered again); ask again"
            )

    def metrics_view(self) -> metrics.ClusterView:
        """The cluster's state for a Prometheus scrape (from the HTTP server's thread)."""
        with self._lock:
            cluster = self._cluster
            members = cluster.membership.members.values()
            alive = sum(1 for m in members if m.alive)
            jobs = []
            for job, record in sorted(cluster.jobs.items()):
                if record.released:
                    continue
                steps = cluster.rank_steps(job)
                whole = len(steps) == record.world_size and record.world_size > 0
                protection = cluster.protection.get(job)
                current = protection is not None and protection.generation == record.generation
                jobs.append(
                    metrics.JobView(
                        job=job,
                        generation=record.generation,
                        world_size=record.world_size,
                        committed=min(s.committed for s in steps.values()) if whole else -1,
                        protected=protection.keep if protection is not None and current else -1,
                    )
                )
            return metrics.ClusterView(
                alive=alive, failed=len(cluster.membership.members) - alive, groups=len(cluster.groups.groups), jobs=tuple(jobs)
            )

    def _status(self) -> pb.GetClusterStatusResponse:
        cluster = self._cluster
        agents = []
        for node, member in sorted(cluster.membership.members.items()):
            group = cluster.groups.position_of(node)
            agents.append(
                pb.AgentStatus(
                    agent=wire.agent_to_proto(member.info, node in cluster.announced_draining),
                    alive=member.alive,
                    group=group,
                    memory_used_bytes=cluster.memory_used.get(node, 0),
                    drain=wire.drain_to_proto(cluster.drain_status(node)) if member.draining else None,
                )
            )
        jobs = []
        for job, record in sorted(cluster.jobs.items()):
            if record.released:
                continue
            steps = cluster.rank_steps(job)
            ranks = [
                pb.JobRankStatus(rank=r, committed_step=s.committed, protected_step=s.protected) for r, s in sorted(steps.items())
            ]
            jobs.append(pb.JobStatus(job=job, generation=record.generation, world_size=record.world_size, ranks=ranks))
        return pb.GetClusterStatusResponse(agents=agents, jobs=jobs, metrics_address=self.metrics_address)
