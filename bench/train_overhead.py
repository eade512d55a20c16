"""What snapshotting every step costs the bundled trainer: steps/s with memckpt off and on.

One agent, then the trainer under torchrun, once with `--snapshot-every 0` and once with
`--snapshot-every 1`, per round; rounds alternate the order. Steps/s comes from rank 0's step
timestamps after the warm-up steps; the figure reported is the median over rounds.

    python bench/train_overhead.py [--preset default] [--steps 30] [--ranks 2] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from snapshot_stall import log_tail, progress, running_agent

from memckpt.local import AgentProcess, read_events, start_torchrun, stop_process, torchrun_command
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.sizes import parse_size
from memckpt.trainer.model import PRESETS

WARMUP_STEPS = 3  # the first steps pay allocation, thread start-up and the first registration


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainerRun:
    """One torchrun of the trainer, as rank 0 saw it."""

    snapshot_every: int
    steps_per_s: float  # from step timestamps, warm-up skipped
    end_steps_per_s: float  # the trainer's own figure: every step of the loop
    mean_stall_ms: float  # every step, the first (registration) included
    median_stall_ms: float  # steps after the warm-up
    snapshot_failures: dict[str, int]


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
        pb_grpc.AgentServiceStub(channel).ReleaseJob(pb.ReleaseJobRequest(job=job), timeout=30)


def run_trainer(args: argparse.Namespace, agent: AgentProcess, workdir: Path, snapshot_every: int) -> TrainerRun:
    job = f"bench-{uuid.uuid4().hex[:8]}"
    events_path, log_path = workdir / f"{job}.events.jsonl", workdir / f"{job}.log"
    trainer_args = [
        "--job",
        job,
        "--steps",
        str(args.steps),
        "--snapshot-every",
        str(snapshot_every),
        "--preset",
        args.preset,
        "--socket",
        str(agent.socket_path),
        "--events",
        str(events_path),
    ]
    command = torchrun_command(nproc=args.ranks, max_restarts=0, trainer_args=trainer_args)
    process = start_torchrun(command, log_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        returncode = process.wait(args.timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        stop_process(process)
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
        release_job(agent.socket_path, job)
    return summarize(events, snapshot_every, log_path)


def is_finished(events: Sequence[dict[str, Any]], ranks: int) -> bool:
    """Whether every rank wrote its 'end' event (the loop finished and the summary is in)."""
    return {e["rank"] for e in events if e["event"] == "end"} == set(range(ranks))


def summarize(events: list[dict[str, Any]], snapshot_every: int, log_path: Path) -> TrainerRun:
    ends = [e for e in events if e["event"] == "end" and e["rank"] == 0]
    if not ends:
        raise RuntimeError(f"rank 0 wrote no 'end' event; log tail:\n{log_tail(log_path)}")
    end = ends[-1]
    failures = dict(end["snapshot_failures"])
    if failures:  # a run whose snapshots failed measures nothing about snapshots
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
    )


def measure(args: argparse.Namespace, workdir: Path) -> OverheadReport:
    runs: dict[int, list[TrainerRun]] = {0: [], 1: []}
    with running_agent(workdir, memory_limit_bytes=args.memory_limit) as agent:
        for round_index in range(args.rounds):
            order = (0, 1) if round_index % 2 == 0 else (1, 0)  # alternate, so drift hits both
            for snapshot_every in order:
                run = run_trainer(args, agent, workdir, snapshot_every)
                runs[snapshot_every].append(run)
                progress(
                    f"round {round_index + 1}/{args.rounds} snapshot_every={snapshot_every}: "
                    f"{run.steps_per_s:.3f} steps/s after warm-up, {run.end_steps_per_s:.3f} whole loop, "
                    f"stall per step: mean {run.mean_stall_ms:.1f} ms, median after warm-up "
                    f"{run.median_stall_ms:.1f} ms"
                )
    return report_of(args, runs[0], runs[1])


def report_of(args: argparse.Namespace, off: list[TrainerRun], on: list[TrainerRun]) -> OverheadReport:
    def median(runs: list[TrainerRun], figure: str) -> float:
        return float(statistics.median(getattr(r, figure) for r in runs))

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
    )


def format_table(report: OverheadReport) -> str:
    r = report
    return "\n".join(
        [
            f"preset {r.preset}, {r.ranks} ranks, {r.steps} steps, {r.rounds} round(s); {r.aggregate}",
            f"{'snapshots':<12} | {'steps/s after warm-up':>21} | {'steps/s whole loop':>18}",
            f"{'off':<12} | {r.steps_per_s_off:21.3f} | {r.end_steps_per_s_off:18.3f}",
            f"{'every step':<12} | {r.steps_per_s_every_step:21.3f} | {r.end_steps_per_s_every_step:18.3f}",
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
    args = parser.parse_args(argv)
    if args.steps < 2 or args.ranks < 1 or args.rounds < 1:
        parser.error("--steps must be at least 2, --ranks and --rounds at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="memckpt-bench-"))
    try:
        report = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(dataclasses.asdict(report)) if args.json else format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
