"""`memckpt demo`: a local cluster loses a rank, then a whole node, and resumes from memory, bit for bit.

It starts a coordinator and several agents on this machine, each agent standing for one
node (its own socket, shared memory, peer port and failure domain), and runs the bundled
trainer twice under torchrun with the same seed, rank r talking to node r's agent: once
undisturbed (the reference), once with faults injected at steps drawn from the seed.

- `rank`: SIGKILL of one trainer rank. torchrun restarts the workers; every rank restores
  from its own node's memory.
- `node`: the rank's whole node is lost: SIGKILL of its agent and of the rank, and its
  shared memory removed. A replacement agent starts in its place; the lost rank's snapshot
  is rebuilt there from the erasure-coded fragments its peers hold.

The losses of both runs are then compared step by step.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memckpt.local import LocalCluster, read_events, start_torchrun, stop_process, torchrun_command, wait_until

FAULTS = ("rank", "node")
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    ranks: int = 2
    nodes: int = 4  # agents; at least k+m+1 = 4, and at least `ranks`
    steps: int = 30
    snapshot_every: int = 1
    seed: int = 0
    preset: str = "small"
    faults: tuple[str, ...] = FAULTS  # injected in this order, into successive torchrun attempts
    kill_rank: int = 1
    fault_steps: tuple[int, ...] | None = None  # None: drawn from the seed, spread over the run
    memory_limit: str = "2GiB"
    workdir: Path | None = None
    keep_workdir: bool = False
    step_delay_s: float = 0.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if unknown := [f for f in self.faults if f not in FAULTS]:
            raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
        if not 0 <= self.kill_rank < self.ranks:
            raise ValueError(f"kill_rank {self.kill_rank} is not a rank of {self.ranks}")
        if self.nodes < max(self.ranks, 4):
            raise ValueError(f"{self.nodes} nodes: need at least max(ranks, 4) (an owner and k+m=3 peers)")
        if self.fault_steps is not None and len(self.fault_steps) != len(self.faults):
            raise ValueError(f"{len(self.faults)} faults but {len(self.fault_steps)} fault steps")


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    fault: str  # "rank" or "node"
    rank: int
    killed_after_step: int
    restored_step: int
    steps_recomputed: int
    recovery_s: float  # from the kill until every rank has restored
    restore_s: float  # the slowest rank's restore call
    sources: dict[int, str]  # rank -> "local" or "fragments"
    lost_node: str = ""
    replacement_node: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    recoveries: list[Recovery]
    steps_recomputed: int
    recovery_s: float  # the slowest recovery
    final_loss: float
    reference_final_loss: float
    bit_exact: bool
    mismatched_steps: list[int]
    workdir: str

    def as_dict(self) -> dict[str, Any]:
        result = {name: getattr(self, name) for name in self.__slots__}
        result["recoveries"] = [{name: getattr(r, name) for name in r.__slots__} for r in self.recoveries]
        return result


def choose_fault_steps(config: DemoConfig) -> tuple[int, ...]:
    """One step per fault, drawn from the seed, each in its own span of the run's middle."""
    if config.fault_steps is not None:
        return config.fault_steps
    rng = random.Random(config.seed)
    spans = len(config.faults)
    low, high = max(3, config.steps // 5), max(3 + spans, 4 * config.steps // 5)
    width = max(1, (high - low) // spans)
    return tuple(rng.randint(low + i * width, low + (i + 1) * width - 1) for i in range(spans))


def trainer_args(config: DemoConfig, job: str, socket_template: Path, events: Path) -> list[str]:
    return [
        *("--job", job, "--steps", str(config.steps), "--snapshot-every", str(config.snapshot_every)),
        *("--seed", str(config.seed), "--preset", config.preset, "--socket", str(socket_template)),
        *("--events", str(events), "--step-delay-s", str(config.step_delay_s)),
    ]


def run_demo(config: DemoConfig, progress: Progress = print) -> DemoResult:
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="memckpt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    cluster = LocalCluster(
        workdir=workdir,
        nodes=config.nodes,
        memory_limit=config.memory_limit,
        shm_prefix=f"memckpt-demo-{tag}.",
        token=uuid.uuid4().hex,
    )
    try:
        progress(f"starting a coordinator and {config.nodes} agents (k=2, m=1); logs in {workdir}")
        cluster.start()
        progress(f"reference run: {config.ranks} ranks, {config.steps} steps, seed {config.seed} ...")
        reference = _run_job(config, f"ref-{tag}", cluster, workdir, faults=(), progress=progress)
        planned = list(zip(config.faults, choose_fault_steps(config)))
        progress("fault run: " + ", then ".join(f"{_describe(f)} after step {s}" for f, s in planned) + " ...")
        fault = _run_job(config, f"job-{tag}", cluster, workdir, faults=planned, progress=progress)
    finally:
        cluster.stop()
        if not config.keep_workdir and config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return _compare(reference, fault, str(workdir))


def _describe(fault: str) -> str:
    return {"rank": "SIGKILL of a rank", "node": "loss of a whole node"}[fault]


@dataclass(slots=True, kw_only=True)
class _Fault:
    fault: str
    rank: int
    kill_time: float
    lost_node: str = ""
    replacement_node: str = ""


@dataclass(slots=True, kw_only=True)
class _JobRun:
    events: list[dict[str, Any]]
    faults: list[_Fault] = field(default_factory=list)


def _run_job(
    config: DemoConfig,
    job: str,
    cluster: LocalCluster,
    workdir: Path,
    *,
    faults: Sequence[tuple[str, int]],
    progress: Progress,
) -> _JobRun:
    events_path, log = workdir / f"{job}.events.jsonl", workdir / f"{job}.log"
    command = torchrun_command(
        nproc=config.ranks,
        max_restarts=len(faults),
        trainer_args=trainer_args(config, job, cluster.socket_template, events_path),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = start_torchrun(command, log, env=env)
    run = _JobRun(events=[])
    try:
        for attempt, (fault, step) in enumerate(faults):
            victim = _wait_for_step(events_path, log, config.kill_rank, step, attempt, process, config.timeout_s)
            run.faults.append(_inject(fault, victim, cluster, progress))
        returncode = process.wait(config.timeout_s)
    finally:
        stop_process(process)
    if returncode != 0:
        raise RuntimeError(f"torchrun for job {job} exited with {returncode}; the end of {log}:\n{_tail(log)}")
    run.events = read_events(events_path)
    return run


def _tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for an error that has to explain itself where the file is gone."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(unreadable: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _inject(fault: str, victim: dict[str, Any], cluster: LocalCluster, progress: Progress) -> _Fault:
    rank, pid = victim["rank"], victim["pid"]
    if fault == "rank":
        os.kill(pid, signal.SIGKILL)
        progress(f"  killed rank {rank} (pid {pid}) after step {victim['step']}; torchrun restarts the workers")
        return _Fault(fault=fault, rank=rank, kill_time=time.time())
    lost = cluster.lose_node(rank)  # the rank's host: its agent gets SIGKILL, its shared memory goes
    os.kill(pid, signal.SIGKILL)
    kill_time = time.time()
    progress(f"  lost node {lost} (its agent, rank {rank} and its shared memory) after step {victim['step']}")
    replacement = cluster.replace_node(rank)
    progress(f"  replacement node {replacement} joined in its place; torchrun restarts the workers")
    return _Fault(fault=fault, rank=rank, kill_time=kill_time, lost_node=lost, replacement_node=replacement)


def _wait_for_step(path: Path, log: Path, rank: int, step: int, attempt: int, process: Any, timeout_s: float) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def reached() -> bool:
        if process.poll() is not None:
            raise RuntimeError(
                f"torchrun exited with {process.returncode} before rank {rank} reached step {step}; "
                f"the end of {log}:\n{_tail(log)}"
            )
        found[:] = [
            e
            for e in read_events(path)
            if e["event"] == "step" and e["rank"] == rank and e["step"] >= step and e["attempt"] == attempt
        ]
        return bool(found)

    wait_until(reached, timeout_s, f"rank {rank} to reach step {step} in attempt {attempt}", interval_s=0.01)
    return found[0]


def _losses(events: list[dict[str, Any]]) -> dict[int, str]:
    """Rank 0's loss per step; a later attempt overrides an earlier one (the run that counts)."""
    losses: dict[int, str] = {}
    for e in sorted((e for e in events if e["event"] == "step" and e["rank"] == 0), key=lambda e: e["attempt"]):
        losses[e["step"]] = e["loss_hex"]
    return losses


def _recovery(run: _JobRun, index: int) -> Recovery:
    fault = run.faults[index]
    restores = [e for e in run.events if e["event"] == "restore" and e["attempt"] == index + 1]
    if not restores:
        raise RuntimeError(f"after the {fault.fault} fault the restarted workers restored nothing from memory")
    steps = {e["step"] for e in restores}
    if len(steps) != 1:
        raise RuntimeError(f"after the {fault.fault} fault ranks restored different steps: {sorted(steps)}")
    restored = steps.pop()
    before = [e["step"] for e in run.events if e["event"] == "step" and e["attempt"] == index]
    killed_after = max(before)
    return Recovery(
        fault=fault.fault,
        rank=fault.rank,
        killed_after_step=killed_after,
        restored_step=restored,
        steps_recomputed=max(0, killed_after - restored),
        recovery_s=max(e["t"] for e in restores) - fault.kill_time,
        restore_s=max(e["restore_s"] for e in restores),
        sources={e["rank"]: e.get("source", "local") for e in sorted(restores, key=lambda e: e["rank"])},
        lost_node=fault.lost_node,
        replacement_node=fault.replacement_node,
    )


def _compare(reference: _JobRun, fault: _JobRun, workdir: str) -> DemoResult:
    recoveries = [_recovery(fault, i) for i in range(len(fault.faults))]
    ref, got = _losses(reference.events), _losses(fault.events)
    # A step restored is one every rank committed, and a rank snapshots a step before the
    # all-reduce of its loss: ranks killed in that all-reduce never log the step they restore.
    unlogged_ok = {r.restored_step for r in recoveries}
    mismatched = sorted(s for s in ref if got.get(s) != ref[s] and (s in got or s not in unlogged_ok))
    final = max(ref)
    return DemoResult(
        recoveries=recoveries,
        steps_recomputed=sum(r.steps_recomputed for r in recoveries),
        recovery_s=max((r.recovery_s for r in recoveries), default=0.0),
        final_loss=float.fromhex(got[final]) if final in got else float("nan"),
        reference_final_loss=float.fromhex(ref[final]),
        bit_exact=not mismatched and final in got,
        mismatched_steps=mismatched,
        workdir=workdir,
    )
