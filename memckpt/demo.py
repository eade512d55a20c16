"""`memckpt demo`: a local job loses a rank to SIGKILL and resumes from memory, bit for bit.

It starts one agent and runs the bundled trainer twice under torchrun with the same seed:
once undisturbed (the reference), once with a rank killed at a step drawn from the seed.
torchrun restarts the workers, they restore from the agent, and the losses are compared.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memckpt.local import AgentProcess, read_events, start_torchrun, stop_process, torchrun_command, wait_until


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    ranks: int = 2
    steps: int = 30
    snapshot_every: int = 1
    seed: int = 0
    preset: str = "small"
    kill_rank: int = 1
    kill_at_step: int | None = None  # None: drawn from the seed, in the middle half of the run
    memory_limit: str = "2GiB"
    workdir: Path | None = None
    keep_workdir: bool = False
    step_delay_s: float = 0.0
    timeout_s: float = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    kill_step: int
    restored_step: int
    steps_recomputed: int
    recovery_s: float
    restore_s: float
    final_loss: float
    reference_final_loss: float
    bit_exact: bool
    mismatched_steps: list[int]
    workdir: str

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def choose_kill_step(config: DemoConfig) -> int:
    if config.kill_at_step is not None:
        return config.kill_at_step
    low, high = max(2, config.steps // 4), max(2, 3 * config.steps // 4)
    return random.Random(config.seed).randint(low, high)


def trainer_args(config: DemoConfig, job: str, socket_path: Path, events: Path) -> list[str]:
    return [
        "--job",
        job,
        "--steps",
        str(config.steps),
        "--snapshot-every",
        str(config.snapshot_every),
        "--seed",
        str(config.seed),
        "--preset",
        config.preset,
        "--socket",
        str(socket_path),
        "--events",
        str(events),
        "--step-delay-s",
        str(config.step_delay_s),
    ]


def run_demo(config: DemoConfig, progress: Any = print) -> DemoResult:
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="memckpt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    agent = AgentProcess(
        socket_path=workdir / "agent.sock",
        shm_prefix=f"memckpt-demo-{tag}.",
        memory_limit=config.memory_limit,
        log_path=workdir / "agent.log",
        extra_args=["--on-exit", "remove"],
    )
    try:
        agent.start()
        progress(f"agent up (pid {agent.pid}, socket {agent.socket_path}); logs in {workdir}")
        progress(f"reference run: {config.ranks} ranks, {config.steps} steps, seed {config.seed} ...")
        reference = _run_job(config, f"ref-{tag}", agent, workdir, kill_step=None, progress=progress)
        progress(f"fault run: SIGKILL of rank {config.kill_rank} after step {choose_kill_step(config)} ...")
        fault = _run_job(config, f"job-{tag}", agent, workdir, kill_step=choose_kill_step(config), progress=progress)
    finally:
        agent.stop()
        if not config.keep_workdir and config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return _compare(reference, fault, str(workdir))


@dataclass(frozen=True, slots=True, kw_only=True)
class _JobRun:
    events: list[dict[str, Any]]
    kill_step: int | None
    kill_time: float | None


def _run_job(
    config: DemoConfig, job: str, agent: AgentProcess, workdir: Path, *, kill_step: int | None, progress: Any
) -> _JobRun:
    events_path = workdir / f"{job}.events.jsonl"
    command = torchrun_command(
        nproc=config.ranks,
        max_restarts=0 if kill_step is None else 1,
        trainer_args=trainer_args(config, job, agent.socket_path, events_path),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = start_torchrun(command, workdir / f"{job}.log", env=env)
    kill_time = None
    try:
        if kill_step is not None:
            victim = _wait_for_step(events_path, config.kill_rank, kill_step, process, config.timeout_s)
            os.kill(victim["pid"], signal.SIGKILL)
            kill_time = time.time()
            progress(
                f"  killed rank {config.kill_rank} (pid {victim['pid']}) after step {victim['step']}; "
                "torchrun restarts the workers"
            )
        returncode = process.wait(config.timeout_s)
    finally:
        stop_process(process)
    if returncode != 0:
        raise RuntimeError(f"torchrun for job {job} exited with {returncode}; see {workdir / (job + '.log')}")
    events = read_events(events_path)
    return _JobRun(events=events, kill_step=kill_step, kill_time=kill_time)


def _wait_for_step(path: Path, rank: int, step: int, process: Any, timeout_s: float) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def reached() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"torchrun exited with {process.returncode} before rank {rank} reached step {step}")
        found[:] = [e for e in read_events(path) if e["event"] == "step" and e["rank"] == rank and e["step"] >= step]
        return bool(found)

    wait_until(reached, timeout_s, f"rank {rank} to reach step {step}", interval_s=0.01)
    return found[0]


def _losses(events: list[dict[str, Any]]) -> dict[int, str]:
    """Rank 0's loss per step; a later attempt overrides an earlier one (the run that counts)."""
    losses: dict[int, str] = {}
    for e in sorted((e for e in events if e["event"] == "step" and e["rank"] == 0), key=lambda e: e["attempt"]):
        losses[e["step"]] = e["loss_hex"]
    return losses


def _compare(reference: _JobRun, fault: _JobRun, workdir: str) -> DemoResult:
    restores = [e for e in fault.events if e["event"] == "restore" and e["attempt"] >= 1]
    if not restores:
        raise RuntimeError("the restarted workers restored nothing from memory")
    restored_steps = {e["step"] for e in restores}
    if len(restored_steps) != 1:
        raise RuntimeError(f"ranks restored different steps: {sorted(restored_steps)}")
    restored = restored_steps.pop()
    before = [e["step"] for e in fault.events if e["event"] == "step" and e["attempt"] == 0]
    kill_step = max(before)
    ref, got = _losses(reference.events), _losses(fault.events)
    mismatched = sorted(s for s in ref if got.get(s) != ref[s])
    assert fault.kill_time is not None
    final = max(ref)
    return DemoResult(
        kill_step=kill_step,
        restored_step=restored,
        steps_recomputed=max(0, kill_step - restored),
        recovery_s=max(e["t"] for e in restores) - fault.kill_time,
        restore_s=max(e["restore_s"] for e in restores),
        final_loss=float.fromhex(got[final]) if final in got else float("nan"),
        reference_final_loss=float.fromhex(ref[final]),
        bit_exact=not mismatched and final in got,
        mismatched_steps=mismatched,
        workdir=workdir,
    )
