"""How one coordinator copes with thousands of agents: heartbeat latency and the whole job's plan.

One real `memckpt-coordinator` process; a few load-generator processes (grpc.aio, a few TCP
connections each) play thousands of agents that register, then heartbeat every second with
their whole inventory, as `agent/coordination.py` does: per rank they own, the two committed
slots (the newer one protected half a step later), and one fragment of each rank of the three
agents before them (k=2, m=1). Ranks commit a new step every `--step-interval-s`, so the
inventories change all the time, as in training with a snapshot every step.

Each agent heartbeats over its own StreamHeartbeats stream, as the agents do (`--rpc unary`: one
Heartbeat call each, as agents of older coordinators do). A heartbeat's latency runs from its
send to its reply, measured by the client. A client that
falls behind its schedule (the machine is shared) sends late: that lag is the client's, not
the coordinator's, and is reported apart, with the share of heartbeats sent on time. After the
steady-state window the job restarts (StartGeneration) and asks for its recovery plan for every
rank (GetRecoveryPlan, pinned), then every rank locates its snapshots (LocateSnapshots, the
RPC the agents' restore path calls), while the heartbeats go on; the plan is also computed in
process, without gRPC, on the same inventory.

The baseline, measured in the same run: the same load generators against a bare grpc.aio
server that parses each heartbeat and answers with fixed bytes, keeping no state. Its CPU
per heartbeat is gRPC's own share on this machine, the floor under any coordinator in Python;
the coordinator's beside it is what its bookkeeping adds.

    python bench/coordinator_scale.py --agents 2000 --ranks-per-agent 8 --duration-s 30 [--rpc unary] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil

from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.service import CoordinatorServicer
from memckpt.coordinator.state import quiet_collector
from memckpt.coordinator.wire import held_to_proto
from memckpt.errors import Unavailable
from memckpt.local import CoordinatorProcess, stop_process
from memckpt.protos import coordinator_pb2 as pb
from memckpt.rpc import exception_for_status

JOB = "scale"
K, M = 2, 1
FIRST_STEP = 100
SNAPSHOT_BYTES = 1 << 30
DOMAINS = 50  # racks
ON_TIME_S = 0.1  # a heartbeat sent later than this after its slot was late (the client's fault)
# a heartbeat slower than this is counted in the second of the window it was sent in: slow ones
# in bursts that the bare server sees too are the machine's pauses, not the coordinator's
SLOW_S = 0.1
CALL_TIMEOUT_S = 10.0
CHANNELS_PER_CLIENT = 4
FLOOR_WINDOW_S = 10.0  # the baseline's window at most
T = TypeVar("T")
REGISTER_CONCURRENCY = 32
LOCATE_CONCURRENCY = 64
LOCATE_ATTEMPTS = 5
LOCATE_RETRY_S = 0.2
TARGET_HEARTBEAT_P99_MS = 50.0
TARGET_PLAN_S = 1.0
SERVICE = "/memckpt.v1.CoordinatorService/"
LOG_TAIL_BYTES = 4000


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the simulated cluster --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    agents: int
    ranks_per_agent: int
    step_interval_s: float

    @property
    def ranks(self) -> int:
        return self.agents * self.ranks_per_agent

    def steps_at(self, t: float, t0: float) -> tuple[int, int]:
        """(newest committed, newest protected) step of every rank at time `t`: a step commits
        every `step_interval_s` from `t0`, and is protected half an interval later."""
        steps = max(0.0, t - t0) / self.step_interval_s
        return FIRST_STEP + math.floor(steps), FIRST_STEP - 1 + math.floor(steps + 0.5)


def node_name(agent: int) -> str:
    return f"node-{agent:05d}"


def agent_info(agent: int) -> AgentInfo:
    return AgentInfo(
        node=node_name(agent),
        address=f"10.{agent // 250}.{agent % 250}.1:7401",
        capacity_bytes=64 << 30,
        domain=f"rack-{agent % DOMAINS:03d}",
    )


def held_entries(shape: Shape, agent: int, committed: int, protected: int) -> Iterator[tuple[int, int, bool, int]]:
    """What one agent holds, as (rank, step, protected, fragment index or -1 for a whole copy):
    two committed slots per own rank, one fragment of each rank of the k+m agents before it
    (its holders are the k+m agents after the owner)."""
    for rank in range(agent * shape.ranks_per_agent, (agent + 1) * shape.ranks_per_agent):
        for step in (committed, committed - 1):
            yield rank, step, step <= protected, -1
    for distance in range(1, K + M + 1):
        owner = (agent - distance) % shape.agents
        if owner == agent:
            continue
        for rank in range(owner * shape.ranks_per_agent, (owner + 1) * shape.ranks_per_agent):
            yield rank, protected, False, distance - 1


def inventory(shape: Shape, agent: int, committed: int, protected: int) -> tuple[Held, ...]:
    """`held_entries` as the agents' dataclasses."""
    return tuple(
        Held(job=JOB, rank=rank, step=step, generation=1, protected=is_protected)
        if index < 0
        else Held(job=JOB, rank=rank, step=step, generation=1, fragment_indices=(index,), k=K, m=M, size_bytes=SNAPSHOT_BYTES)
        for rank, step, is_protected, index in held_entries(shape, agent, committed, protected)
    )


def heartbeat_request(shape: Shape, agent: int, incarnation: int, committed: int, protected: int) -> pb.HeartbeatRequest:
    """An agent's heartbeat, built straight as protobuf (a third of the cost of going through
    `inventory`: the load generators must leave the machine to the coordinator)."""
    request = pb.HeartbeatRequest(
        node=node_name(agent), incarnation=incarnation, memory_used_bytes=2 * shape.ranks_per_agent * SNAPSHOT_BYTES
    )
    add = request.held.add
    for rank, step, is_protected, index in held_entries(shape, agent, committed, protected):
        if index < 0:
            add(job=JOB, rank=rank, step=step, generation=1, protected=is_protected)
        else:
            add(job=JOB, rank=rank, step=step, generation=1, fragment_indices=(index,), k=K, m=M, size_bytes=SNAPSHOT_BYTES)
    return request


# --- a load-generator process -----------------------------------------------------------------


@dataclass(slots=True)
class ClientStats:
    latencies_s: list[float] = dataclasses.field(default_factory=list)  # in the window
    lags_s: list[float] = dataclasses.field(default_factory=list)
    during_plan_latencies_s: list[float] = dataclasses.field(default_factory=list)  # after the window
    slow_sent_s: list[float] = dataclasses.field(default_factory=list)  # when heartbeats slower than SLOW_S were sent
    missed: int = 0  # slots skipped because the client was a whole interval behind
    failed: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # status code -> count
    refused: int = 0
    inventory_entries: int = 0
    heartbeats_sent: int = 0


class SimulatedAgents:
    def __init__(self, shape: Shape, first: int, count: int, address: str, interval_s: float, rpc: str) -> None:
        self.shape = shape
        self.rpc = rpc
        self.agents = range(first, first + count)
        self.interval_s = interval_s
        self.channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.channel_id", i)])
            for i in range(CHANNELS_PER_CLIENT)
        ]
        # raw bytes both ways: requests are serialized once per inventory change
        self.register = [c.unary_unary(SERVICE + "RegisterAgent") for c in self.channels]
        self.heartbeat = [c.unary_unary(SERVICE + "Heartbeat") for c in self.channels]
        self.heartbeat_stream = [c.stream_stream(SERVICE + "StreamHeartbeats") for c in self.channels]
        self.incarnations: dict[int, int] = {}
        self.requests: dict[int, tuple[tuple[int, int], bytes]] = {}
        self.messages: dict[int, pb.HeartbeatRequest] = {}  # each agent's, at its last steps
        self.stats = ClientStats()
        self.t0 = 0.0
        self.window = (0.0, 0.0)
        self.stopping = asyncio.Event()

    def _channel(self, agent: int) -> int:
        return agent % len(self.channels)

    async def register_all(self) -> None:
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def one(agent: int) -> None:
            async with gate:
                committed, protected = self.shape.steps_at(time.monotonic(), math.inf)
                request = pb.RegisterAgentRequest(
                    agent=pb.AgentDescription(**dataclasses.asdict(agent_info(agent))),
                    held=held_to_proto(inventory(self.shape, agent, committed, protected)),
                )
                raw = await self.register[self._channel(agent)](request.SerializeToString(), timeout=CALL_TIMEOUT_S * 6)
                self.incarnations[agent] = pb.RegisterAgentResponse.FromString(raw).incarnation

        await asyncio.gather(*(one(a) for a in self.agents))

    def _request(self, agent: int, now: float) -> bytes:
        steps = self.shape.steps_at(min(now, self.window[1]), self.t0)  # the job stops at the window's end
        cached = self.requests.get(agent)
        if cached is not None and cached[0] == steps:
            return cached[1]
        message = self.messages.get(agent)
        if message is None:
            message = self.messages[agent] = heartbeat_request(self.shape, agent, self.incarnations[agent], *steps)
            self.stats.inventory_entries = len(message.held)
        else:  # the same entries at newer steps: set in place, at a third of the cost of building them
            for entry, (_, step, is_protected, _) in zip(message.held, held_entries(self.shape, agent, *steps), strict=True):
                entry.step, entry.protected = step, is_protected
        request = message.SerializeToString()
        self.requests[agent] = (steps, request)
        return request

    async def beat(self, agent: int, phase_s: float) -> None:
        loop = asyncio.get_running_loop()
        call = self.heartbeat[self._channel(agent)] if self.rpc == "unary" else self._streamed(agent)
        slot = self.t0 + phase_s
        stats = self.stats
        while not self.stopping.is_set():
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if self.stopping.is_set():
                    return
            request = self._request(agent, slot)
            sent = time.monotonic()
            try:
                raw = await call(request, timeout=CALL_TIMEOUT_S)
            except (grpc.aio.AioRpcError, TimeoutError, RuntimeError) as exc:
                stats.failed += 1
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                stats.failures[code] = stats.failures.get(code, 0) + 1
                raw = None
            done = time.monotonic()
            stats.heartbeats_sent += 1
            if raw is not None and not pb.HeartbeatResponse.FromString(raw).accepted:
                stats.refused += 1
            if self.window[0] <= slot < self.window[1]:
                stats.latencies_s.append(done - sent)
                stats.lags_s.append(sent - slot)
                if done - sent > SLOW_S:
                    stats.slow_sent_s.append(sent - self.window[0])
            elif slot >= self.window[1]:
                stats.during_plan_latencies_s.append(done - sent)
            slot += self.interval_s
            while slot < time.monotonic() - self.interval_s:  # a whole interval behind: skip a beat
                stats.missed += self.window[0] <= slot < self.window[1]
                slot += self.interval_s

    def _streamed(self, agent: int) -> Callable[..., Awaitable[bytes]]:
        """A heartbeat function over the agent's own stream, opened on first use and again after
        an error. No timeout per message (a task each would cost the load generator more than a
        heartbeat costs the coordinator): a reply that never comes is cut at the end."""
        opened = self.heartbeat_stream[self._channel(agent)]
        stream: Any = None

        async def call(request: bytes, timeout: float) -> bytes:
            nonlocal stream
            if stream is None:
                stream = opened()
            try:
                await stream.write(request)
                raw = await stream.read()
            except BaseException:
                stream.cancel()
                stream = None
                raise
            if raw is grpc.aio.EOF:
                stream = None
                raise RuntimeError("the coordinator ended the heartbeat stream")
            return bytes(raw)

        return call

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def read_line(loop: asyncio.AbstractEventLoop) -> str:
    return await loop.run_in_executor(None, sys.stdin.readline)


async def client_main(args: argparse.Namespace) -> int:
    """One load generator: registers its agents, says `ready`, then heartbeats from the `start`
    line it reads (t0, window start, window end: monotonic seconds) until `stop`; prints its stats."""
    loop = asyncio.get_running_loop()
    shape = Shape(agents=args.agents, ranks_per_agent=args.ranks_per_agent, step_interval_s=args.step_interval_s)
    sim = SimulatedAgents(shape, args.first_agent, args.agent_count, args.address, args.interval_s, args.rpc)
    cpu_start = time.process_time()
    await sim.register_all()
    # as the coordinator does: a full collection paused a load generator 70-300 ms, and every
    # reply that came meanwhile was measured that late
    quiet_collector()
    print("ready", flush=True)
    _, t0, begin, end = (await read_line(loop)).split()
    sim.t0, sim.window = float(t0), (float(begin), float(end))
    cpu_begin, wall_begin = time.process_time(), time.monotonic()
    tasks = [
        asyncio.create_task(sim.beat(a, sim.interval_s * ((a * 0.618034) % 1.0)))  # spread phases evenly
        for a in sim.agents
    ]
    await read_line(loop)  # "stop"
    cpu_end, wall_end = time.process_time(), time.monotonic()
    sim.stopping.set()
    _, stuck = await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S)
    for task in stuck:  # a heartbeat never answered
        task.cancel()
        sim.stats.failed += 1
        sim.stats.failures["NO_REPLY"] = sim.stats.failures.get("NO_REPLY", 0) + 1
    await sim.close()
    report = dataclasses.asdict(sim.stats) | {
        "cpu_s": cpu_end - cpu_begin,
        "wall_s": wall_end - wall_begin,
        "register_cpu_s": cpu_begin - cpu_start,
        "window_s": float(end) - float(begin),
    }
    print(json.dumps(report), flush=True)
    return 0


async def echo_main() -> int:
    """The baseline: a bare grpc.aio server that answers registrations and heartbeats (one
    stream per agent, as the coordinator) with fixed bytes and keeps no state. What it costs
    per heartbeat is gRPC's own share, the floor under any coordinator in Python. Prints its
    address, serves until stdin closes."""
    group = [pb.AgentDescription(node=node_name(a), address=agent_info(a).address) for a in range(K + M)]
    protection = [pb.JobProtection(job=JOB, generation=1, target_step=FIRST_STEP, keep_step=FIRST_STEP)]
    reply = pb.HeartbeatResponse(accepted=True, group=group, k=K, m=M, protection=protection).SerializeToString()
    registered = pb.RegisterAgentResponse(incarnation=1, lease_s=10.0, heartbeat_interval_s=1.0).SerializeToString()

    async def register(request: bytes, context: Any) -> bytes:
        return registered

    async def heartbeat(request: pb.HeartbeatRequest, context: Any) -> bytes:
        return reply

    async def heartbeats(requests: AsyncIterator[pb.HeartbeatRequest], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:  # parsed, as any server must
            yield reply

    handlers = {
        "RegisterAgent": grpc.unary_unary_rpc_method_handler(register),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(heartbeat, pb.HeartbeatRequest.FromString),
        "StreamHeartbeats": grpc.stream_stream_rpc_method_handler(heartbeats, pb.HeartbeatRequest.FromString),
    }
    quiet_collector()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.strip("/"), handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await server.stop(1.0)
    return 0


# --- the driver -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleReport:
    agents: int
    ranks: int
    clients: int
    duration_s: float
    heartbeat_interval_s: float
    heartbeat_rpc: str  # "stream": StreamHeartbeats, one stream per agent; "unary": a Heartbeat call each
    step_interval_s: float
    inventory_entries: int  # per heartbeat
    register_s: float
    heartbeats: int  # in the window
    heartbeats_per_s: float
    heartbeat_p50_ms: float
    heartbeat_p90_ms: float
    heartbeat_p99_ms: float
    heartbeat_max_ms: float
    heartbeats_on_time: float  # share sent within ON_TIME_S of their slot
    client_lag_p50_ms: float
    client_lag_p99_ms: float
    heartbeats_missed: int  # slots the clients skipped, a whole interval behind
    heartbeats_failed: int
    heartbeat_failures: dict[str, int]  # status code -> count
    heartbeats_refused: int
    coordinator_cpu_pct: float  # of one core, over the window
    coordinator_cpu_us_per_heartbeat: float
    # the baseline: a bare gRPC server (fixed replies, no state) under the same load (`echo_main`)
    floor_heartbeats_per_s: float
    floor_heartbeat_p50_ms: float
    floor_heartbeat_p99_ms: float
    floor_cpu_pct: float
    floor_cpu_us_per_heartbeat: float
    clients_cpu_pct: float  # all load generators together, of one core
    plan_s: float  # GetRecoveryPlan of the whole job, first ask (computed and pinned)
    plan_again_s: float  # the pinned plan asked again
    plan_step: int
    plan_sources: int
    plan_compute_s: float  # the plan's first ask in process, no gRPC: pending reports filed, the plan, the reply's bytes
    locate_all_s: float  # LocateSnapshots for every rank, LOCATE_CONCURRENCY in flight
    locate_retries: dict[str, int]  # status code -> locates asked again after it
    locate_p50_ms: float
    locate_p99_ms: float
    locate_compute_s: float  # Cluster.locate of every rank in process
    during_restore_heartbeat_p99_ms: float  # heartbeats while the plan and locates ran
    during_restore_heartbeat_max_ms: float
    heartbeat_target_met: bool
    plan_target_met: bool


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a server process and its children (the coordinator's state process)."""
    process = psutil.Process(pid)
    return sum(t.user + t.system for p in (process, *process.children(recursive=True)) for t in (p.cpu_times(),))


def start_clients(args: argparse.Namespace, address: str) -> list[subprocess.Popen[str]]:
    per_client = math.ceil(args.agents / args.clients)
    clients = []
    for first in range(0, args.agents, per_client):
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--client",
            *("--address", address, "--first-agent", str(first), "--agent-count", str(min(per_client, args.agents - first))),
            *("--agents", str(args.agents), "--ranks-per-agent", str(args.ranks_per_agent)),
            *("--interval-s", str(args.interval_s), "--step-interval-s", str(args.step_interval_s)),
            *("--rpc", args.rpc),
        ]
        clients.append(
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        )
    return clients


def expect_line(client: subprocess.Popen[str], timeout_s: float, what: str) -> str:
    assert client.stdout is not None
    ready, _, _ = select.select([client.stdout], [], [], timeout_s)
    line = client.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"load generator {client.pid} gave no {what} (exit code {client.poll()})")
    return line


def tell(clients: Sequence[subprocess.Popen[str]], line: str) -> None:
    for client in clients:
        assert client.stdin is not None
        client.stdin.write(line + "\n")
        client.stdin.flush()


@dataclass(frozen=True, slots=True, kw_only=True)
class Storm:
    plan_s: float
    plan_again_s: float
    step: int
    sources: int
    locate_all_s: float
    locate_latencies_s: list[float]
    locate_retries: dict[str, int]  # status code -> LocateSnapshots asked again after it


async def restore_storm(address: str, shape: Shape) -> Storm:
    """A restarted job: a new generation, the whole job's plan (twice: computed, then pinned),
    then every rank's LocateSnapshots. A locate that fails with a code the agents take for "ask
    again" (memckpt.rpc: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) is asked again, as they do,
    and counted."""
    async with grpc.aio.insecure_channel(address) as channel:
        start = channel.unary_unary(
            SERVICE + "StartGeneration",
            request_serializer=pb.StartGenerationRequest.SerializeToString,
            response_deserializer=pb.StartGenerationResponse.FromString,
        )
        plan_call = channel.unary_unary(
            SERVICE + "GetRecoveryPlan",
            request_serializer=pb.GetRecoveryPlanRequest.SerializeToString,
            response_deserializer=pb.GetRecoveryPlanResponse.FromString,
        )
        locate = channel.unary_unary(
            SERVICE + "LocateSnapshots",
            request_serializer=pb.LocateSnapshotsRequest.SerializeToString,
            response_deserializer=pb.LocateSnapshotsResponse.FromString,
        )
        while True:  # a fresh coordinator answers locations and plans one lease after its start
            try:
                await locate(pb.LocateSnapshotsRequest(job=JOB, rank=0), timeout=60)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
        generation = (
            await start(pb.StartGenerationRequest(job=JOB, world_size=shape.ranks, previous_generation=1), timeout=60)
        ).generation
        began = time.perf_counter()
        plan = await plan_call(pb.GetRecoveryPlanRequest(job=JOB, generation=generation), timeout=600)
        plan_s = time.perf_counter() - began
        began = time.perf_counter()
        await plan_call(pb.GetRecoveryPlanRequest(job=JOB, generation=generation), timeout=600)
        plan_again_s = time.perf_counter() - began
        if not plan.has_plan or len(plan.sources) != shape.ranks:
            raise RuntimeError(f"no plan for the whole job: {plan.reason}")
        progress(f"plan: step {plan.step} for {len(plan.sources)} ranks in {plan_s:.3f}s (pinned: {plan_again_s:.3f}s)")
        latencies: list[float] = []
        retries: dict[str, int] = {}
        gate = asyncio.Semaphore(LOCATE_CONCURRENCY)

        async def one(rank: int) -> None:
            async with gate:
                sent = time.perf_counter()
                for attempt in range(1, LOCATE_ATTEMPTS + 1):
                    try:
                        reply = await locate(pb.LocateSnapshotsRequest(job=JOB, rank=rank), timeout=600)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exception_for_status(exc.code()) is not Unavailable or attempt == LOCATE_ATTEMPTS:
                            raise
                        retries[exc.code().name] = retries.get(exc.code().name, 0) + 1
                        await asyncio.sleep(LOCATE_RETRY_S)
                latencies.append(time.perf_counter() - sent)
                if not reply.locations or reply.lost_reason:
                    raise RuntimeError(f"rank {rank} cannot be located: {reply.lost_reason}")

        began = time.perf_counter()
        await asyncio.gather(*(one(r) for r in range(shape.ranks)))
        locate_all_s = time.perf_counter() - began
        asked_again = f" ({sum(retries.values())} asked again: {retries})" if retries else ""
        progress(f"LocateSnapshots of {shape.ranks} ranks: {locate_all_s:.3f}s{asked_again}")
        return Storm(
            plan_s=plan_s,
            plan_again_s=plan_again_s,
            step=plan.step,
            sources=len(plan.sources),
            locate_all_s=locate_all_s,
            locate_latencies_s=latencies,
            locate_retries=retries,
        )


def compute_in_process(shape: Shape) -> tuple[float, float]:
    """The plan's first ask and every rank's locate, on the same inventory, in process: no gRPC
    and no other load. The plan's ask is timed as the coordinator meets it after a restart:
    every agent's last report came since the last refresh and waits to be filed (in a cluster
    larger than FILE_INLINE_MAX_AGENTS: a smaller one files each report as it comes), and the
    reply's bytes are the end."""
    cluster = Cluster(k=K, m=M, lease_s=1e9)
    servicer = CoordinatorServicer(cluster, heartbeat_interval_s=1.0, warmup_s=0.0)
    committed, protected = shape.steps_at(0.0, math.inf)
    reports = []
    for agent in range(shape.agents):
        older = inventory(shape, agent, committed - 1, protected - 1)
        incarnation, _ = cluster.register_agent(agent_info(agent), older, now=0.0)
        newest = heartbeat_request(shape, agent, incarnation, committed, protected)
        reports.append((agent, incarnation, newest.SerializeToString()))
    cluster.refresh_protection(now=0.0)
    for agent, incarnation, report in reports:
        assert servicer.accept_report(node_name(agent), incarnation, report, now=0.0)
    generation = cluster.start_generation(JOB, shape.ranks, previous=1)
    request = pb.GetRecoveryPlanRequest(job=JOB, generation=generation)
    thresholds = gc.get_threshold()
    quiet_collector()  # the coordinator's collector settings
    try:
        began = time.perf_counter()
        reply = asyncio.run(servicer.GetRecoveryPlan(request, None)).SerializeToString()
        plan_s = time.perf_counter() - began
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    plan = pb.GetRecoveryPlanResponse.FromString(reply)
    assert plan.has_plan and plan.step == committed and len(plan.sources) == shape.ranks, plan.reason
    began = time.perf_counter()
    for rank in range(shape.ranks):
        found, _ = cluster.locate(JOB, rank)
        assert found, rank
    return plan_s, time.perf_counter() - began


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """The load generators' reports of one steady-state window, and the server's CPU in it."""

    results: list[dict[str, Any]]
    register_s: float
    server_cpu_s: float

    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r["latencies_s"]]


def heartbeat_window(
    args: argparse.Namespace, address: str, server_pid: int, warmup_s: float, duration_s: float, after: Callable[[], T]
) -> tuple[Window, T]:
    """Registers the simulated agents with the server at `address`, heartbeats through the
    warm-up and the measured window, runs `after` while the heartbeats go on, then stops them."""
    clients: list[subprocess.Popen[str]] = []
    try:
        began = time.monotonic()
        clients = start_clients(args, address)
        for client in clients:
            expect_line(client, 600, "ready")
        register_s = time.monotonic() - began
        progress(f"{args.agents} agents registered in {register_s:.2f}s; warming up {warmup_s:.0f}s")
        t0 = time.monotonic() + 0.2
        window = (t0 + warmup_s, t0 + warmup_s + duration_s)
        tell(clients, f"start {t0!r} {window[0]!r} {window[1]!r}")
        time.sleep(max(0.0, window[0] - time.monotonic()))
        cpu_begin = process_cpu_s(server_pid)
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu_window = process_cpu_s(server_pid) - cpu_begin
        outcome = after()
        tell(clients, "stop")
        results = [json.loads(expect_line(c, 120, "report")) for c in clients]
        for client in clients:
            client.wait(30)
    finally:
        for client in clients:
            stop_process(client, grace_s=2.0)  # type: ignore[arg-type]
    return Window(results=results, register_s=register_s, server_cpu_s=cpu_window), outcome


def slow_by_second(window: Window) -> list[int]:
    """How many heartbeats slower than SLOW_S were sent in each second of the window."""
    sent = [t for r in window.results for t in r["slow_sent_s"]]
    counts = [0] * max(1, math.ceil(max(sent, default=0.0)) + 1)
    for t in sent:
        counts[max(0, int(t))] += 1
    return counts


def measure_floor(args: argparse.Namespace) -> Window:
    """The same load on `echo_main`'s bare server: the same warm-up, a window of at most FLOOR_WINDOW_S."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--echo-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        address = expect_line(server, 60, "address").strip()  # type: ignore[arg-type]
        progress(f"baseline: a bare gRPC server (pid {server.pid}) under the same load")
        window, _ = heartbeat_window(args, address, server.pid, args.warmup_s, min(args.duration_s, FLOOR_WINDOW_S), lambda: None)
        return window
    finally:
        stop_process(server, grace_s=2.0)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> ScaleReport:
    shape = Shape(agents=args.agents, ranks_per_agent=args.ranks_per_agent, step_interval_s=args.step_interval_s)
    with tempfile.TemporaryDirectory(prefix="memckpt-coordinator-scale-") as workdir:
        coordinator = CoordinatorProcess(
            workdir=Path(workdir),
            extra_args=[
                *("--lease-s", str(max(10.0, 10 * args.interval_s)), "--heartbeat-interval-s", str(args.interval_s)),
                *("--k", str(K), "--m", str(M), "--log-level", "WARNING"),
                *(("--no-state-process",) if args.one_process else ()),
            ],
        )

        def restart_the_job() -> Storm:
            progress("steady state measured; the job stops, and restarts once every agent reported its last step")
            time.sleep(args.interval_s + 0.5)
            storm = asyncio.run(restore_storm(coordinator.address, shape))
            time.sleep(args.interval_s)  # heartbeats stuck behind the restore complete
            return storm

        try:
            coordinator.start()
            progress(f"coordinator pid {coordinator.pid} on {coordinator.address}; registering {args.agents} agents")
            measured, storm = heartbeat_window(
                args, coordinator.address, coordinator.pid, args.warmup_s, args.duration_s, restart_the_job
            )
        except BaseException:
            tail = coordinator.log_path.read_bytes()[-LOG_TAIL_BYTES:] if coordinator.log_path.exists() else b""
            progress(f"coordinator log tail:\n{tail.decode(errors='replace')}")
            raise
        finally:
            coordinator.stop()
            if args.coordinator_log and coordinator.log_path.exists():
                Path(args.coordinator_log).write_bytes(coordinator.log_path.read_bytes())
    locates = storm.locate_latencies_s
    results, register_s, cpu_window = measured.results, measured.register_s, measured.server_cpu_s
    progress("computing the plan in process")
    plan_compute_s, locate_compute_s = compute_in_process(shape)
    floor = measure_floor(args)
    for name, window in (("coordinator", measured), ("bare gRPC", floor)):
        progress(f"{name}: heartbeats slower than {SLOW_S * 1e3:.0f} ms, by the second of the window: {slow_by_second(window)}")
    floor_latencies = floor.latencies()
    latencies = measured.latencies()
    lags = [x for r in results for x in r["lags_s"]]
    during = [x for r in results for x in r["during_plan_latencies_s"]]
    p99_ms = percentile(latencies, 0.99) * 1e3
    return ScaleReport(
        agents=args.agents,
        ranks=shape.ranks,
        clients=len(results),
        duration_s=args.duration_s,
        heartbeat_interval_s=args.interval_s,
        heartbeat_rpc=args.rpc,
        step_interval_s=args.step_interval_s,
        inventory_entries=max(r["inventory_entries"] for r in results),
        register_s=register_s,
        heartbeats=len(latencies),
        heartbeats_per_s=len(latencies) / args.duration_s,
        heartbeat_p50_ms=percentile(latencies, 0.50) * 1e3,
        heartbeat_p90_ms=percentile(latencies, 0.90) * 1e3,
        heartbeat_p99_ms=p99_ms,
        heartbeat_max_ms=max(latencies, default=math.nan) * 1e3,
        heartbeats_on_time=sum(lag <= ON_TIME_S for lag in lags) / max(1, len(lags)),
        client_lag_p50_ms=percentile(lags, 0.50) * 1e3,
        client_lag_p99_ms=percentile(lags, 0.99) * 1e3,
        heartbeats_missed=sum(r["missed"] for r in results),
        heartbeats_failed=sum(r["failed"] for r in results),
        heartbeat_failures={
            code: sum(r["failures"].get(code, 0) for r in results) for code in {c for r in results for c in r["failures"]}
        },
        heartbeats_refused=sum(r["refused"] for r in results),
        coordinator_cpu_pct=100 * cpu_window / args.duration_s,
        coordinator_cpu_us_per_heartbeat=1e6 * cpu_window / max(1, len(latencies)),
        floor_heartbeats_per_s=len(floor_latencies) / min(args.duration_s, FLOOR_WINDOW_S),
        floor_heartbeat_p50_ms=percentile(floor_latencies, 0.50) * 1e3,
        floor_heartbeat_p99_ms=percentile(floor_latencies, 0.99) * 1e3,
        floor_cpu_pct=100 * floor.server_cpu_s / min(args.duration_s, FLOOR_WINDOW_S),
        floor_cpu_us_per_heartbeat=1e6 * floor.server_cpu_s / max(1, len(floor_latencies)),
        clients_cpu_pct=100 * sum(r["cpu_s"] / r["wall_s"] for r in results),
        plan_s=storm.plan_s,
        plan_again_s=storm.plan_again_s,
        plan_step=storm.step,
        plan_sources=storm.sources,
        plan_compute_s=plan_compute_s,
        locate_all_s=storm.locate_all_s,
        locate_retries=storm.locate_retries,
        locate_p50_ms=percentile(locates, 0.50) * 1e3,
        locate_p99_ms=percentile(locates, 0.99) * 1e3,
        locate_compute_s=locate_compute_s,
        during_restore_heartbeat_p99_ms=percentile(during, 0.99) * 1e3,
        during_restore_heartbeat_max_ms=max(during, default=math.nan) * 1e3,
        heartbeat_target_met=p99_ms < TARGET_HEARTBEAT_P99_MS,
        plan_target_met=storm.plan_s < TARGET_PLAN_S,
    )


def format_table(r: ScaleReport) -> str:
    def target(ok: bool, limit: str) -> str:
        return f"target < {limit}: {'met' if ok else 'MISSED'}"

    rows: list[tuple[str, str, str]] = [
        ("heartbeats measured", f"{r.heartbeats}", f"{r.heartbeats_per_s:.0f}/s over {r.duration_s:.0f}s"),
        ("heartbeat p50", f"{r.heartbeat_p50_ms:.2f} ms", "send to reply, at the client"),
        ("heartbeat p90", f"{r.heartbeat_p90_ms:.2f} ms", ""),
        ("heartbeat p99", f"{r.heartbeat_p99_ms:.2f} ms", target(r.heartbeat_target_met, f"{TARGET_HEARTBEAT_P99_MS:.0f} ms")),
        ("heartbeat max", f"{r.heartbeat_max_ms:.2f} ms", ""),
        ("sent on time", f"{100 * r.heartbeats_on_time:.1f} %", f"within {ON_TIME_S * 1e3:.0f} ms of the slot"),
        ("client lag p50/p99", f"{r.client_lag_p50_ms:.1f}/{r.client_lag_p99_ms:.1f} ms", "the load generators' own delay"),
        (
            "missed/failed/refused",
            f"{r.heartbeats_missed}/{r.heartbeats_failed}/{r.heartbeats_refused}",
            ", ".join(f"{code}: {n}" for code, n in sorted(r.heartbeat_failures.items())),
        ),
        (
            "coordinator CPU",
            f"{r.coordinator_cpu_pct:.0f} %",
            f"of one core, steady state: {r.coordinator_cpu_us_per_heartbeat:.0f} us a heartbeat",
        ),
        (
            "baseline: bare gRPC p50/p99",
            f"{r.floor_heartbeat_p50_ms:.1f}/{r.floor_heartbeat_p99_ms:.1f} ms",
            f"same load, fixed replies, no state: {r.floor_cpu_pct:.0f} % of one core, "
            f"{r.floor_cpu_us_per_heartbeat:.0f} us a heartbeat",
        ),
        ("load generators CPU", f"{r.clients_cpu_pct:.0f} %", f"of one core, {r.clients} processes, whole run"),
        ("register all agents", f"{r.register_s:.2f} s", ""),
        ("GetRecoveryPlan", f"{r.plan_s:.3f} s", f"step {r.plan_step}, " + target(r.plan_target_met, f"{TARGET_PLAN_S:.0f} s")),
        ("  pinned, again", f"{r.plan_again_s:.3f} s", ""),
        ("  in process", f"{r.plan_compute_s:.3f} s", "every agent's last report filed, the plan, its reply's bytes; no gRPC"),
        ("LocateSnapshots x all", f"{r.locate_all_s:.3f} s", f"{r.ranks} calls, {LOCATE_CONCURRENCY} in flight"),
        ("  per call p50/p99", f"{r.locate_p50_ms:.2f}/{r.locate_p99_ms:.2f} ms", ""),
        (
            "  asked again",
            f"{sum(r.locate_retries.values())}",
            ", ".join(f"{code}: {n}" for code, n in sorted(r.locate_retries.items())) or "as agents do after UNAVAILABLE etc.",
        ),
        ("  in process", f"{r.locate_compute_s:.3f} s", "Cluster.locate of every rank"),
        (
            "heartbeat p99/max in restore",
            f"{r.during_restore_heartbeat_p99_ms:.1f}/{r.during_restore_heartbeat_max_ms:.1f} ms",
            "while the plan and locates ran",
        ),
    ]
    lines = [
        f"{r.agents} agents, {r.ranks} ranks, {r.inventory_entries} inventory entries per heartbeat, "
        f"heartbeat every {r.heartbeat_interval_s:g}s ({r.heartbeat_rpc}), a step every {r.step_interval_s:g}s",
        f"{'what':<30} | {'figure':>14} | note",
    ]
    lines += [f"{name:<30} | {value:>14} | {note}" for name, value, note in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=2000, help="simulated agents (default: 2000)")
    parser.add_argument("--ranks-per-agent", type=int, default=8, help="ranks of the job per agent (default: 8)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="steady-state window measured (default: 20)")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="heartbeats before the window (default: 5)")
    parser.add_argument("--interval-s", type=float, default=1.0, help="heartbeat interval (default: 1)")
    parser.add_argument("--step-interval-s", type=float, default=2.0, help="a new step commits this often (default: 2)")
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes (default: 2)")
    parser.add_argument(
        "--rpc",
        choices=("stream", "unary"),
        default="stream",
        help="heartbeats over one StreamHeartbeats stream per agent, or one Heartbeat call each (default: stream)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run: 100 agents, 1 s warm-up, 3 s window")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--one-process", action="store_true", help="the coordinator without its state process (state_process false)"
    )
    parser.add_argument("--coordinator-log", metavar="PATH", help="keep the coordinator's log here (it runs at WARNING)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # a load generator
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # the baseline's server
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--first-agent", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--agent-count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return asyncio.run(client_main(args))
    if args.echo_server:
        return asyncio.run(echo_main())
    if args.quick:
        args.agents, args.warmup_s, args.duration_s = 100, 1.0, 3.0
    if args.agents < K + M + 1 or args.ranks_per_agent < 1 or args.duration_s <= 0 or args.clients < 1:
        parser.error(f"need --agents >= {K + M + 1}, --ranks-per-agent >= 1, --duration-s > 0, --clients >= 1")
    report = run(args)
    if args.json:
        print(json.dumps(dataclasses.asdict(report)), flush=True)
    else:
        print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
