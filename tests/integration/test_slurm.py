"""deploy/slurm/memckpt.sbatch run for real on a one-node Slurm cluster (the Debian slurm-wlm
and munge, set up by .ci/setup-slurm as root): the script starts the coordinator, an agent and a
2-rank trainer under torchrun; the node fails under the running job (to Slurm), Slurm requeues
it, and the requeued run resumes from the node's memory where the first run stopped; its losses
match an uninterrupted run of the same seed bit for bit.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.local import read_events, start_torchrun, stop_process, torchrun_command, wait_until
from tests.integration.helpers import losses

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "deploy" / "slurm" / "memckpt.sbatch"
SETUP = REPO / ".ci" / "setup-slurm"
VENV = Path(sys.prefix)  # the virtualenv running the tests: memckpt, torch, torchrun

STEPS = 36
SEED = 13
RANKS = 2
FAIL_AFTER_STEP = 10  # the node fails once every rank of the first run has logged this step
STEP_DELAY_S = 0.3  # the tiny model's steps take milliseconds; the node must fail mid-run
QUIET_S = 3.0  # slurmd's abort of a job id polls every second (see wait_for_quiet_node)


def slurm(*args: str, check: bool = True, timeout_s: float = 60, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, env=env)
    if check:
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}"
    return result.stdout


def ensure_slurm() -> None:
    """A one-node cluster up: .ci/setup-slurm (idempotent) as root; a failure there fails the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root: .ci/setup-slurm installs and starts Slurm (slurm-wlm, munge) on this machine")
    result = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f".ci/setup-slurm failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key=value pairs (empty once Slurm has forgotten the job)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def node_state(node: str) -> str:
    return slurm("sinfo", "-h", "-N", "-n", node, "-o", "%t").strip()


def ensure_node_up(node: str, timeout_s: float = 60) -> None:
    """The node back in service: slurmd re-registers it at once (ReturnToService=2); resumed by hand otherwise."""
    deadline = time.monotonic() + timeout_s
    while (state := node_state(node)) not in ("idle", "mix", "alloc"):
        if state.rstrip("*~#") in ("down", "drain", "drng", "fail"):
            slurm("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} still {state!r} after {timeout_s:.0f}s")
        time.sleep(0.5)


def step_reached(events: list[dict[str, Any]]) -> int:
    """The newest step every rank has logged."""
    per_rank = [max((e["step"] for e in events if e["event"] == "step" and e["rank"] == r), default=0) for r in range(RANKS)]
    return min(per_rank)


@pytest.mark.timeout(900)
def test_sbatch_example_job_requeued_after_a_node_failure_resumes_from_memory(tmp_path: Path) -> None:
    ensure_slurm()
    tag = uuid.uuid4().hex[:10]
    name = f"memckpt-slurm-{tag}"
    shm_prefix = f"mct-{tag}."
    node = slurm("hostname", "-s").strip()
    coordinator_port, peer_port, rdzv_port = free_ports(3)
    run_dir, events_path, job_log = tmp_path / "run", tmp_path / "events.jsonl", tmp_path / "job.log"
    trainer_args = [
        *("--job", name, "--steps", str(STEPS), "--seed", str(SEED), "--preset", "tiny"),
        *("--step-delay-s", str(STEP_DELAY_S)),
    ]
    env = {
        **os.environ,
        "MEMCKPT_VENV": str(VENV),
        "MEMCKPT_RUN_DIR": str(run_dir),
        "MEMCKPT_NODE_DIR": str(tmp_path / "node"),
        "MEMCKPT_SHM_PREFIX": shm_prefix,
        "MEMCKPT_MEMORY_LIMIT": "256MiB",
        "MEMCKPT_NPROC_PER_NODE": str(RANKS),
        "MEMCKPT_COORDINATOR_PORT": str(coordinator_port),
        "MEMCKPT_PEER_PORT": str(peer_port),
        "MEMCKPT_RDZV_PORT": str(rdzv_port),
    }
    # The uninterrupted run of the same seed, without memckpt, alongside.
    reference_events = tmp_path / "reference.jsonl"
    reference_command = torchrun_command(
        nproc=RANKS,
        max_restarts=0,
        trainer_args=[
            *("--job", f"{name}-ref", "--steps", str(STEPS), "--seed", str(SEED), "--preset", "tiny"),
            *("--snapshot-every", "0", "--events", str(reference_events)),
        ],
    )
    reference = start_torchrun(reference_command, tmp_path / "reference.log")
    job_id = ""
    try:
        sbatch = ["sbatch", "--parsable", f"--job-name={name}", f"--output={job_log}", f"--chdir={tmp_path}", str(SBATCH)]
        job_id = slurm(*sbatch, "-m", "memckpt.trainer", *trainer_args, "--events", str(events_path), env=env)
        job_id = job_id.strip().split(";")[0]  # "ID" or "ID;CLUSTER"

        def log_tail() -> str:
            logs = [job_log, *sorted(run_dir.glob("*.log"))] if run_dir.exists() else [job_log]
            return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in logs if p.exists())

        def first_run_reached(step: int) -> bool:
            state = job_info(job_id).get("JobState", "")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state}:\n{log_tail()}"
            return step_reached(read_events(events_path)) >= step

        wait_until(lambda: first_run_reached(FAIL_AFTER_STEP), 180, f"the first run to reach step {FAIL_AFTER_STEP}", 0.1)

        # The node fails, as Slurm sees it: marked DOWN, Slurm ends the job on it (NODE_FAIL)
        # and, as the job is --requeue, puts it back in the queue. On a one-node cluster slurmd
        # cannot really lose the only node (nothing would be left to run the requeued job); what
        # it stands for is the N-node case, where every node but the failed one keeps its memory
        # and its agent's slots outlive the job's processes: here the only node is such a node.
        slurm("scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason=memckpt test {tag}: node failure")
        wait_until(lambda: job_info(job_id).get("Restarts") == "1", 60, f"Slurm to requeue job {job_id}")
        ensure_node_up(node)

        def old_instance_gone() -> bool:
            """Nothing of the failed instance left on the node: starting the requeued one earlier
            makes slurmd refuse it ("already running") and Slurm requeue and hold it again."""
            steps = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job_id}\."], capture_output=True, timeout=30)
            return steps.returncode != 0 and node_state(node) == "idle" and job_info(job_id).get("JobState") == "PENDING"

        def wait_for_quiet_node(what: str) -> None:
            """The old instance gone, and gone for QUIET_S. The node comes back (ReturnToService=2)
            while the failed instance's steps are still dying; slurmctld sees them registered for
            a PENDING job and has slurmd abort the job id, and slurmd's abort polls the job id every
            second until it finds nothing running, SIGKILLing whatever runs under that id: a
            requeued instance started within that second is killed before its ranks start
            (slurmctld: WTERMSIG 9). Waiting out one poll after the steps are gone avoids it."""
            quiet_since: list[float] = []

            def quiet() -> bool:
                if not old_instance_gone():
                    quiet_since.clear()
                    return False
                quiet_since[:] = quiet_since or [time.monotonic()]
                return time.monotonic() - quiet_since[0] >= QUIET_S

            wait_until(quiet, 120, what, 0.5)

        wait_for_quiet_node(f"the failed instance of job {job_id} to be gone")

        def start_now() -> bool:
            """A requeued job is held back (BeginTime) for two minutes; an operator may start it at once."""
            done = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)
            return done.returncode == 0 or job_info(job_id).get("JobState") != "PENDING"

        wait_until(start_now, 30, f"the requeued job {job_id} to accept StartTime=now", 0.5)

        requeued_again = False

        def finished() -> bool:
            nonlocal requeued_again
            info = job_info(job_id)
            state = info.get("JobState", "")
            started = sum(1 for e in read_events(events_path) if e["event"] == "start")
            if state == "FAILED" and started == RANKS and not requeued_again:
                # The abort of wait_for_quiet_node's docstring still caught the requeued instance
                # (its steps took over 10 s to die and slurmd's polls slowed to every 10 s): once more.
                print(f"job {job_id} was killed before its ranks started; requeued once more:\n{log_tail()}")
                requeued_again = True
                slurm("scontrol", "requeue", job_id)
                ensure_node_up(node)
                wait_for_quiet_node(f"the killed instance of job {job_id} to be gone")
                wait_until(start_now, 30, f"the requeued job {job_id} to accept StartTime=now", 0.5)
                return False
            assert state in ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING", "COMPLETED"), (
                f"job {job_id} is {state}:\n{log_tail()}"
            )
            return state == "COMPLETED"

        wait_until(finished, 240, f"the requeued job {job_id} to finish")
        info = job_info(job_id)
        assert info["ExitCode"] == "0:0", log_tail()

        assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-3000:]
        expected = losses(read_events(reference_events))
        assert sorted(expected) == list(range(1, STEPS + 1))

        events = read_events(events_path)
        # The first run's processes were gone before Slurm started the job again: its events
        # are the ones before the requeued run's first "start".
        boundary = [i for i, e in enumerate(events) if e["event"] == "start"][RANKS]
        first, second = events[:boundary], events[boundary:]
        assert not {e["pid"] for e in first} & {e["pid"] for e in second}, "a first-run rank outlived the requeue"
        reached = step_reached(first)
        assert losses(first) == {s: expected[s] for s in losses(first)}, "the first run differs from the reference"
        restores = [e for e in second if e["event"] == "restore"]
        assert sorted(e["rank"] for e in restores) == list(range(RANKS)), f"every rank restores once: {restores}"
        assert {e["source"] for e in restores} == {"local"}, "the requeued run restored from the node's memory"
        (restored,) = {e["step"] for e in restores}
        # every step is snapshotted; the newest one every rank committed before the node failed (a
        # rank snapshots a step before the all-reduce of its loss, and logs it after: one more)
        assert reached - 2 <= restored <= reached + 1 and restored >= FAIL_AFTER_STEP - 2, (restored, reached)
        resumed = losses(second)
        assert sorted(resumed) == list(range(restored + 1, STEPS + 1)), "the requeued run went on from the restored step"
        mismatched = [s for s in resumed if resumed[s] != expected[s]]
        assert not mismatched, f"losses after the requeue differ from the uninterrupted run at steps {mismatched}"
        assert [e["event"] for e in second if e["event"] == "end"] == ["end"] * RANKS

        # The requeued run was a new attempt (its own torchrun run id), whose ranks the
        # re-adopting agent let supersede the first run's.
        agent_log = (run_dir / f"agent-{node}.log").read_text()
        assert f"run_id='{job_id}-0'" in agent_log and re.search(rf"run_id='{job_id}-[12]'", agent_log), agent_log[-3000:]
        assert "adopted_ranks=2" in agent_log, "the second run's agent re-adopted both ranks' slots"
        # A clean finish releases the job's memory on every node.
        left = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith((shm_prefix, f"{shm_prefix[:-1]}-frag.")))
        assert not left, f"the finished job left shared memory behind: {left}"
    finally:
        stop_process(reference)
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            live = ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING")
            wait_until(lambda: job_info(job_id).get("JobState") not in live, 60, f"job {job_id} to end after scancel")
        if node_state(node).rstrip("*~#") in ("down", "drain", "drng"):
            slurm("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        for path in DEFAULT_ROOT.iterdir():
            if path.name.startswith((shm_prefix, f"{shm_prefix[:-1]}-frag.")):
                path.unlink(missing_ok=True)
