"""What snapshotting every step costs the bundled trainer: steps/s with memckpt off and on.

One agent, then the trainer under torchrun, once with `--snapshot-every 0` and once with
`--snapshot-every 1`, per round; rounds alternate the order. Steps/s comes from rank 0's step
timestamps after the warm-up steps; the figure reported is the median over rounds.

`--protect`: a local cluster instead (`memckpt.local.LocalCluster`: a coordinator and
`--nodes` agents, one per simulated node, k=2, m=1), rank r talking to node r's agent, so
that every commit is also erasure-coded and sent to three peers, by agents that share the
cores with the ranks. The trainer runs without snapshots and with one every step, as above.
Protection lag: while the snapshotting trainer runs, a thread asks the coordinator where each
rank's snapshots are (LocateSnapshots, what a restore asks) every `--sample-interval-s` and
records the rank's newest committed step (a whole copy on its node) and newest protected step
(all k+m fragments held by peers). `memckpt status --coordinator` is not used: its protected
step is the newest of the owner's two slots that is marked protected, so it reads "none" once
both slots hold newer steps than the protected one, although the peers still hold its fragments.
Each (sample, rank) gives one lag, committed - protected (nothing protected yet counts as
step 0); the samples taken between the end of rank 0's warm-up and its last step count, and
the report gives their median and max. The coordinator learns of commits and protections
from agent heartbeats, so both steps are seen up to a heartbeat interval (0.2 s) late.
Snapshots the agent refused because no slot of the rank was free to write (skipped; training goes
on) are counted, not treated as failures. A rank's own protected step restores that rank only;
after a node loss the job resumes at the newest step protected for every rank, so the same
samples are also measured from that step, as `protect_lag_job_steps_*`.

`--persist-every N`: a third configuration beside off and every step, on a second agent that
also persists to a directory in the run's workdir every N steps (`--persist-rate`, default the
agent's): `steps_per_s_persist`, and `persisted_checkpoints`, the complete checkpoints that
run left (a run of fewer than N steps persists nothing and is refused).

    python bench/train_overhead.py [--preset default] [--steps 30] [--ranks 2] [--rounds 1] [--json]
    python bench/train_overhead.py --protect [--nodes 4] [--agent-arg=--protect-cpu=0.04] [--json]
    python bench/train_overhead.py --persist-every 50 [--steps 110] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import snapshot_stall
from snapshot_stall import log_tail, progress, running_agent

from memckpt.agent.checkpoints import list_checkpoints
from memckpt.local import LocalCluster, read_events, start_torchrun, stop_process, torchrun_command
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import token_metadata
from memckpt.sizes import parse_size
from memckpt.trainer.model import PRESETS

WARMUP_STEPS = 3  # the first steps pay allocation, thread start-up and the first registration
# Four simulated nodes share this machine's cores with the ranks; 0.04 cores each is 8 % of two
# cores for all of them, what a real node would give its one agent out of its spare cores
# (2026-11-29: 0.05 kept 85-89 % of the steps/s with a lag of 5 steps, 0.03 kept 97 % with 16,
# 0.04 kept 92 % with 7).
DEFAULT_AGENT_ARGS = ("--protect-cpu=0.04",)
SKIP_KIND = "Unavailable"  # what a snapshot the agent skipped (no slot free to write) counts as


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainerRun:
    """One torchrun of the trainer, as rank 0 saw it."""

    snapshot_every: int
    steps_per_s: float  # from step timestamps, warm-up skipped
    job: str = ""
    end_steps_per_s: float  # the trainer's own figure: every step of the loop
    mean_stall_ms: float  # every step, the first (registration) included
    median_stall_ms: float  # steps after the warm-up
    snapshot_failures: dict[str, int]
    snapshots_skipped: int = 0  # over every rank: the agent still kept the slot (protection, persistence)
    lags: tuple[int, ...] = ()  # committed - protected, per (sample, rank) after the warm-up
    job_lags: tuple[int, ...] = ()  # committed - the newest step protected for every rank, the same samples
    agent_cores: float = 0.0  # the agents' CPU seconds over the run's wall seconds (with --protect)


@dataclass(frozen=True, slots=True, kw_only=True)
class OverheadReport:
    preset: str
    ranks: int
    steps: int
    rounds: int
    warmup_steps: int
    steps_per_s_off: float  # median over rounds
    steps_per_s_every_step: float
    overhead_pct: float  # extra time per step with a snapshot every step
    end_steps_per_s_off: float
    end_steps_per_s_every_step: float
    end_overhead_pct: float
    mean_stall_ms_every_step: float
    median_stall_ms_every_step: float
    samples_off: tuple[float, ...]
    samples_every_step: tuple[float, ...]
    aggregate: str = "median over rounds"
    # --persist-every: a snapshot every step, persisted every N steps by the agent
    persist_every: int = 0
    steps_per_s_persist: float | None = None
    persist_vs_off: float | None = None  # the share of steps/s kept
    persisted_checkpoints: int = 0  # complete checkpoints the persisting runs left, every round
    samples_persist: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtectReport:
    preset: str
    ranks: int
    nodes: int
    k: int
    m: int
    steps: int
    rounds: int
    warmup_steps: int
    agent_args: tuple[str, ...]
    steps_per_s_off: float  # median over rounds
    steps_per_s_protected: float  # a snapshot every step, protected by the peers
    protected_vs_off: float  # the share of steps/s kept
    protect_lag_steps_median: float  # over every (sample, rank) of every round
    protect_lag_steps_max: int
    lag_samples: int
    protect_lag_job_steps_median: float  # from the newest step protected for every rank (restorable after a node loss)
    protect_lag_job_steps_max: int
    snapshots_skipped: int  # every rank, every round
    snapshots_taken: int  # steps the ranks asked to snapshot, every round
    agent_cores_off: float  # every agent's CPU seconds over the run's wall seconds, median over rounds
    agent_cores_protected: float
    samples_off: tuple[float, ...]
    samples_protected: tuple[float, ...]
    aggregate: str = "median over rounds"


@dataclass(frozen=True, slots=True, kw_only=True)
class LagSample:
    t: float  # unix time the coordinator answered
    rank: int
    committed: int
    protected: int  # -1: nothing protected yet
    protected_by_all: int  # the newest step protected for every rank of the job (what a node loss restores)


def protect_lags(samples: Sequence[LagSample], start_t: float, end_t: float, by_all: bool = False) -> tuple[int, ...]:
    """committed - protected (with `by_all`: - protected for every rank) of each sample taken in
    [start_t, end_t] that has a commit; nothing protected yet counts from step 0. Pure."""
    return tuple(
        s.committed - max(s.protected_by_all if by_all else s.protected, 0)
        for s in samples
        if start_t <= s.t <= end_t and s.committed >= 0
    )


def lag_window(events: Sequence[dict[str, Any]], rank: int, warmup_steps: int) -> tuple[float, float] | None:
    """The times of the end of step `warmup_steps` and of the last step of `rank`: the span
    steps/s is measured over. Pure."""
    times = {e["step"]: e["t"] for e in events if e["event"] == "step" and e["rank"] == rank}
    if not times:
        return None
    last = max(times)
    first = min(warmup_steps, last - 1)
    return (times.get(first, min(times.values())), times[last])


def steps_per_s_after_warmup(events: Sequence[dict[str, Any]], rank: int, warmup_steps: int) -> float | None:
    """Steps per second between the end of step `warmup_steps` and the end of the last step, from
    one rank's step events; None when there are not enough steps. Pure."""
    times = {e["step"]: e["t"] for e in events if e["event"] == "step" and e["rank"] == rank}
    if not times:
        return None
    last = max(times)
    first = min(warmup_steps, last - 1)
    if first < min(times) or last - first < 1:
        return None
    elapsed_s = times[last] - times[first]
    return (last - first) / elapsed_s if elapsed_s > 0 else None


def overhead_pct(steps_per_s_off: float, steps_per_s_on: float) -> float:
    """How much longer a step takes with snapshots on, in percent."""
    return (steps_per_s_off / steps_per_s_on - 1.0) * 100.0


def release_job(socket_path: Path, job: str) -> None:
    """Drops a finished run's slots, so that rounds never add up against the agent's budget."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.ReleaseJob(pb.ReleaseJobRequest(job=job), timeout=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where the trainer's ranks snapshot: one agent's socket, or a cluster's socket template."""

    socket: Path  # may hold {rank}
    agent_socket: Path  # where a finished job is released (on every node, where a coordinator runs)
    cluster: LocalCluster | None = None  # sampled for the protection lag
    agent_pids: tuple[int, ...] = ()  # whose CPU time is counted
    persist_root: Path | None = None  # where the agent persists (--persist-every)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes `pids` have used so far."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run_trainer(args: argparse.Namespace, target: Target, workdir: Path, snapshot_every: int) -> TrainerRun:
    job = f"bench-{uuid.uuid4().hex[:8]}"
    if target.persist_root is not None:
        job = f"persist-{job}"
    events_path, log_path = workdir / f"{job}.events.jsonl", workdir / f"{job}.log"
    trainer_args = [
        *("--job", job, "--steps", str(args.steps), "--snapshot-every", str(snapshot_every)),
        *("--preset", args.preset, "--socket", str(target.socket), "--events", str(events_path)),
    ]
    command = torchrun_command(nproc=args.ranks, max_restarts=0, trainer_args=trainer_args)
    samples: list[LagSample] = []
    sampling = target.cluster is not None and snapshot_every > 0
    cpu_before_s, started = cpu_seconds(target.agent_pids), time.monotonic()
    process = start_torchrun(command, log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with lag_sampler(target.cluster if sampling else None, job, args.ranks, args.sample_interval_s, samples):
            returncode = process.wait(args.timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        stop_process(process)
    agent_cores = (cpu_seconds(target.agent_pids) - cpu_before_s) / (time.monotonic() - started)
    events = read_events(events_path)
    if returncode != 0:
        if returncode is None or not is_finished(events, args.ranks):
            raise RuntimeError(
                f"trainer (snapshot every {snapshot_every}) ended with {returncode} "
                f"(timeout {args.timeout_s}s); log tail:\n{log_tail(log_path)}"
            )
        # torch 2.13 CPU: an FSDP2 + gloo process sometimes aborts at interpreter exit, after
        # destroy_process_group ("terminate called without an active exception"), also without
        # memckpt; every rank had finished, so the run's figures stand
        progress(f"warning: torchrun exited with {returncode} after every rank wrote its 'end' event")
    if snapshot_every > 0:
        release_job(target.agent_socket, job)
    run = summarize(events, snapshot_every, log_path, allow_skips=target.cluster is not None or target.persist_root is not None)
    run = dataclasses.replace(run, agent_cores=agent_cores, job=job)
    window = lag_window(events, rank=0, warmup_steps=WARMUP_STEPS)
    if sampling and window is not None:
        run = dataclasses.replace(run, lags=protect_lags(samples, *window), job_lags=protect_lags(samples, *window, by_all=True))
    return run


@contextmanager
def lag_sampler(cluster: LocalCluster | None, job: str, ranks: int, interval_s: float, into: list[LagSample]) -> Iterator[None]:
    """While the block runs, appends each rank's committed and protected step of `job`, as the
    coordinator reports them (`rank_steps`), to `into` every `interval_s`; nothing without a cluster."""
    if cluster is None:
        yield
        return
    stop = threading.Event()

    def sample() -> None:
        with grpc.insecure_channel(cluster.coordinator.address) as channel:
            stub = cpb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
            while not stop.wait(interval_s):
                try:
                    replies = [
                        stub.LocateSnapshots(
                            cpb.LocateSnapshotsRequest(job=job, rank=rank), metadata=token_metadata(cluster.token), timeout=10
                        )
                        for rank in range(ranks)
                    ]
                except grpc.RpcError as exc:
                    progress(f"warning: LocateSnapshots failed: {exc.code()}")
                    continue
                now = time.time()
                steps = [rank_steps(reply.locations) for reply in replies]
                by_all = max(set.intersection(*(complete for _, complete in steps)), default=-1)
                for rank, (committed, complete) in enumerate(steps):
                    into.append(
                        LagSample(
                            t=now, rank=rank, committed=committed, protected=max(complete, default=-1), protected_by_all=by_all
                        )
                    )

    thread = threading.Thread(target=sample, name="lag-sampler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def rank_steps(locations: Sequence[cpb.SnapshotLocation]) -> tuple[int, set[int]]:
    """A rank's newest committed step (a whole copy on its owner; -1: none) and its protected
    steps (all k+m fragments held by peers), from the coordinator's answer to LocateSnapshots. Pure."""
    committed = max((loc.step for loc in locations if loc.copies), default=-1)
    complete = {loc.step for loc in locations if loc.k > 0 and len({f.index for f in loc.fragments}) >= loc.k + loc.m}
    return committed, complete


def is_finished(events: Sequence[dict[str, Any]], ranks: int) -> bool:
    """Whether every rank wrote its 'end' event (the loop finished and the summary is in)."""
    return {e["rank"] for e in events if e["event"] == "end"} == set(range(ranks))


def summarize(events: list[dict[str, Any]], snapshot_every: int, log_path: Path, allow_skips: bool = False) -> TrainerRun:
    ends = [e for e in events if e["event"] == "end" and e["rank"] == 0]
    if not ends:
        raise RuntimeError(f"rank 0 wrote no 'end' event; log tail:\n{log_tail(log_path)}")
    end = ends[-1]
    failures = dict(end["snapshot_failures"])
    skipped = sum(e["snapshot_failures"].get(SKIP_KIND, 0) for e in events if e["event"] == "end") if allow_skips else 0
    if set(failures) - ({SKIP_KIND} if allow_skips else set()):  # a run whose snapshots failed measures nothing
        raise RuntimeError(f"snapshots failed during the run: {failures}; log tail:\n{log_tail(log_path)}")
    from_steps = steps_per_s_after_warmup(events, rank=0, warmup_steps=WARMUP_STEPS)
    stalls_ms = [e["stall_ms"] for e in events if e["event"] == "step" and e["rank"] == 0]
    return TrainerRun(
        snapshot_every=snapshot_every,
        steps_per_s=from_steps if from_steps is not None else end["steps_per_s"],
        end_steps_per_s=end["steps_per_s"],
        mean_stall_ms=end["mean_stall_ms"],
        median_stall_ms=float(statistics.median(stalls_ms[WARMUP_STEPS:] or stalls_ms or [0.0])),
        snapshot_failures=failures,
        snapshots_skipped=skipped,
    )


def measure(args: argparse.Namespace, workdir: Path) -> OverheadReport:
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(running_agent(workdir, memory_limit_bytes=args.memory_limit))
        target = Target(socket=agent.socket_path, agent_socket=agent.socket_path)
        configs = [Config("off", target, 0), Config("every step", target, 1)]
        if args.persist_every:
            root = workdir / "persisted"
            flags = ["--persist-root", str(root), "--persist-every", str(args.persist_every)]
            flags += ["--persist-rate", args.persist_rate] if args.persist_rate else []
            persisting = stack.enter_context(
                running_agent(workdir, memory_limit_bytes=args.memory_limit, name="persisting-agent", extra_args=flags)
            )
            persist_target = Target(socket=persisting.socket_path, agent_socket=persisting.socket_path, persist_root=root)
            configs.append(Config("persist", persist_target, 1))
        runs = run_rounds(args, configs, workdir)
        persisted = sum(len(complete_checkpoints(root, run.job)) for run in runs.get("persist", ()))
    return report_of(args, runs, persisted)


def complete_checkpoints(root: Path, job: str) -> list[int]:
    return [c.step for c in list_checkpoints(root, job) if c.complete]


def measure_protected(args: argparse.Namespace, workdir: Path) -> ProtectReport:
    cluster = LocalCluster(
        workdir=workdir,
        nodes=args.nodes,
        memory_limit=str(args.memory_limit),
        shm_prefix=f"{snapshot_stall.SHM_PREFIX_ROOT}{uuid.uuid4().hex[:8]}.",
        token=uuid.uuid4().hex,
        k=2,
        m=1,
        agent_args=args.agent_arg,
    )
    try:
        cluster.start()
        progress(f"coordinator and {args.nodes} agents (k=2, m=1) up; logs in {workdir}")
        progress("agent pids: " + " ".join(f"{n}={a.pid}" for n, a in zip(cluster.node_names, cluster.hosts) if a))
        target = Target(
            socket=cluster.socket_template,
            agent_socket=cluster.socket_of(0),  # the release goes to every node through the coordinator
            cluster=cluster,
            agent_pids=tuple(a.pid for a in cluster.hosts if a is not None),
        )
        runs = run_rounds(args, [Config("off", target, 0), Config("protected", target, 1)], workdir)
    except BaseException:
        for node in cluster.node_names:
            progress(f"{node} log tail:\n{log_tail(workdir / f'{node}.log')}")
        raise
    finally:
        cluster.stop()
    return protect_report_of(args, runs["off"], runs["protected"])


@dataclass(frozen=True, slots=True)
class Config:
    """One way to run the trainer: `label` in the report, where it snapshots, how often (0: off)."""

    label: str
    target: Target
    snapshot_every: int


def run_rounds(args: argparse.Namespace, configs: Sequence[Config], workdir: Path) -> dict[str, list[TrainerRun]]:
    """Each round runs the trainer once per configuration, the order reversed every other round."""
    runs: dict[str, list[TrainerRun]] = {c.label: [] for c in configs}
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]  # alternate, so drift hits all
        for config in order:
            snapshot_every = config.snapshot_every
            run = run_trainer(args, config.target, workdir, snapshot_every)
            runs[config.label].append(run)
            lag = (
                f", lag median {statistics.median(run.lags)} max {max(run.lags)} steps (from the step "
                f"protected for every rank: median {statistics.median(run.job_lags)} max {max(run.job_lags)})"
                if run.lags
                else ""
            )
            progress(
                f"round {round_index + 1}/{args.rounds} {config.label} (snapshot_every={snapshot_every}): "
                f"{run.steps_per_s:.3f} steps/s after warm-up, {run.end_steps_per_s:.3f} whole loop, "
                f"stall per step: mean {run.mean_stall_ms:.1f} ms, median after warm-up "
                f"{run.median_stall_ms:.1f} ms, {run.snapshots_skipped} snapshots skipped, "
                f"agents used {run.agent_cores:.2f} cores{lag}"
            )
    return runs


def report_of(args: argparse.Namespace, runs: dict[str, list[TrainerRun]], persisted: int) -> OverheadReport:
    def median(runs: list[TrainerRun], figure: str) -> float:
        return float(statistics.median(getattr(r, figure) for r in runs))

    off, on, persist = runs["off"], runs["every step"], runs.get("persist", [])
    persist_s = median(persist, "steps_per_s") if persist else None
    off_s, on_s = median(off, "steps_per_s"), median(on, "steps_per_s")
    end_off_s, end_on_s = median(off, "end_steps_per_s"), median(on, "end_steps_per_s")
    return OverheadReport(
        preset=args.preset,
        ranks=args.ranks,
        steps=args.steps,
        rounds=args.rounds,
        warmup_steps=min(WARMUP_STEPS, args.steps - 1),
        steps_per_s_off=off_s,
        steps_per_s_every_step=on_s,
        overhead_pct=overhead_pct(off_s, on_s),
        end_steps_per_s_off=end_off_s,
        end_steps_per_s_every_step=end_on_s,
        end_overhead_pct=overhead_pct(end_off_s, end_on_s),
        mean_stall_ms_every_step=median(on, "mean_stall_ms"),
        median_stall_ms_every_step=median(on, "median_stall_ms"),
        samples_off=tuple(r.steps_per_s for r in off),
        samples_every_step=tuple(r.steps_per_s for r in on),
        persist_every=args.persist_every,
        steps_per_s_persist=persist_s,
        persist_vs_off=None if persist_s is None else persist_s / off_s,
        persisted_checkpoints=persisted,
        samples_persist=tuple(r.steps_per_s for r in persist),
    )


def protect_report_of(args: argparse.Namespace, off: list[TrainerRun], on: list[TrainerRun]) -> ProtectReport:
    off_s = float(statistics.median(r.steps_per_s for r in off))
    on_s = float(statistics.median(r.steps_per_s for r in on))
    lags = [lag for r in on for lag in r.lags]
    job = [lag for r in on for lag in r.job_lags]
    if not lags:
        raise RuntimeError("no protection lag was sampled: the runs are too short for --sample-interval-s")
    return ProtectReport(
        preset=args.preset,
        ranks=args.ranks,
        nodes=args.nodes,
        k=2,
        m=1,
        steps=args.steps,
        rounds=args.rounds,
        warmup_steps=min(WARMUP_STEPS, args.steps - 1),
        agent_args=tuple(args.agent_arg),
        steps_per_s_off=off_s,
        steps_per_s_protected=on_s,
        protected_vs_off=on_s / off_s,
        protect_lag_steps_median=float(statistics.median(lags)),
        protect_lag_steps_max=max(lags),
        lag_samples=len(lags),
        protect_lag_job_steps_median=float(statistics.median(job)),
        protect_lag_job_steps_max=max(job),
        snapshots_skipped=sum(r.snapshots_skipped for r in on),
        snapshots_taken=args.steps * args.ranks * len(on),
        agent_cores_off=float(statistics.median(r.agent_cores for r in off)),
        agent_cores_protected=float(statistics.median(r.agent_cores for r in on)),
        samples_off=tuple(r.steps_per_s for r in off),
        samples_protected=tuple(r.steps_per_s for r in on),
    )


def format_protect_table(report: ProtectReport) -> str:
    r = report
    return "\n".join(
        [
            f"preset {r.preset}, {r.ranks} ranks, {r.nodes} agents (k={r.k}, m={r.m}), {r.steps} steps, "
            f"{r.rounds} round(s); {r.aggregate}; agent args {' '.join(r.agent_args) or '-'}",
            f"{'snapshots':<22} | {'steps/s after warm-up':>21}",
            f"{'off':<22} | {r.steps_per_s_off:21.3f}",
            f"{'every step, protected':<22} | {r.steps_per_s_protected:21.3f}",
            f"kept {r.protected_vs_off * 100:.1f}% of the steps/s without snapshots",
            f"protection lag (committed - protected): median {r.protect_lag_steps_median:.1f} steps, "
            f"max {r.protect_lag_steps_max} over {r.lag_samples} samples",
            f"from the newest step protected for every rank: median "
            f"{r.protect_lag_job_steps_median:.1f} steps, max {r.protect_lag_job_steps_max}",
            f"snapshots skipped (no slot free to write): {r.snapshots_skipped} of {r.snapshots_taken}",
            f"the agents used {r.agent_cores_protected:.2f} cores (without snapshots {r.agent_cores_off:.2f})",
        ]
    )


def format_table(report: OverheadReport) -> str:
    r = report
    persist = []
    if r.steps_per_s_persist is not None and r.persist_vs_off is not None:
        persist = [
            f"{'+ persist/' + str(r.persist_every):<12} | {r.steps_per_s_persist:21.3f} | {'':>18}",
            f"persisting every {r.persist_every} steps kept {r.persist_vs_off * 100:.1f}% of the steps/s without "
            f"snapshots; {r.persisted_checkpoints} complete checkpoint(s) written",
        ]
    return "\n".join(
        [
            f"preset {r.preset}, {r.ranks} ranks, {r.steps} steps, {r.rounds} round(s); {r.aggregate}",
            f"{'snapshots':<12} | {'steps/s after warm-up':>21} | {'steps/s whole loop':>18}",
            f"{'off':<12} | {r.steps_per_s_off:21.3f} | {r.end_steps_per_s_off:18.3f}",
            f"{'every step':<12} | {r.steps_per_s_every_step:21.3f} | {r.end_steps_per_s_every_step:18.3f}",
            *persist,
            f"{'overhead':<12} | {r.overhead_pct:20.1f}% | {r.end_overhead_pct:17.1f}%",
            f"stall per step with snapshots: mean {r.mean_stall_ms_every_step:.1f} ms (first step included), "
            f"median {r.median_stall_ms_every_step:.1f} ms after warm-up",
            f"'after warm-up' counts the steps after the first {r.warmup_steps}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model size (default: default)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: 30)")
    parser.add_argument("--ranks", type=int, default=2, help="trainer ranks under torchrun (default: 2)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each configuration, order alternating (default: 1)")
    parser.add_argument("--memory-limit", type=parse_size, default=parse_size("4GiB"), help="agent budget (default: 4GiB)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit for one trainer run (default: 900)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    protect = parser.add_argument_group("protection (--protect)")
    protect.add_argument("--protect", action="store_true", help="a coordinator and --nodes agents, k=2 m=1, instead of one agent")
    protect.add_argument(
        "--nodes", type=int, default=4, help="agents, one per simulated node; at least 4 and --ranks (default: 4)"
    )
    protect.add_argument(
        "--agent-arg",
        action="append",
        help=f"a flag passed to every agent, repeatable (default: {' '.join(DEFAULT_AGENT_ARGS)}; "
        "--agent-arg=--protect-cpu=0 turns pacing off)",
    )
    protect.add_argument(
        "--sample-interval-s", type=float, default=0.25, help="how often the protection lag is sampled (default: 0.25)"
    )
    persist = parser.add_argument_group("persistence (--persist-every)")
    persist.add_argument(
        "--persist-every",
        type=int,
        default=0,
        help="also run the trainer on an agent that persists every N steps (0: not; --steps must exceed it)",
    )
    persist.add_argument("--persist-rate", default="", help="the persisting agent's --persist-rate (default: the agent's)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs (agents', coordinator's, trainer's)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.ranks < 1 or args.rounds < 1:
        parser.error("--steps must be at least 2, --ranks and --rounds at least 1")
    if args.protect and args.nodes < max(4, args.ranks):
        parser.error(f"--nodes {args.nodes}: --protect needs at least max(4, --ranks) agents (an owner and k+m=3 peers)")
    args.agent_arg = args.agent_arg or list(DEFAULT_AGENT_ARGS)
    if args.persist_every and (args.protect or args.persist_every < 0 or args.steps <= args.persist_every):
        parser.error("--persist-every N needs N > 0, --steps above N, and no --protect")
    if args.sample_interval_s <= 0:
        parser.error("--sample-interval-s must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="memckpt-bench-"))
    try:
        report: OverheadReport | ProtectReport = measure_protected(args, workdir) if args.protect else measure(args, workdir)
    finally:
        if args.keep_workdir:
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(dataclasses.asdict(report)), flush=True)
    else:
        print(format_protect_table(report) if isinstance(report, ProtectReport) else format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
