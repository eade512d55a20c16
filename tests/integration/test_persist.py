"""Lazy persistence on one node (no coordinator): the agent writes the bundled trainer's
snapshots to a directory in the `torch.distributed.checkpoint` format, stock PyTorch loads them
bit for bit, retention keeps what it promises, and a job whose memory is gone resumes from the
newest complete checkpoint, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memckpt.agent.checkpoints import list_checkpoints
from memckpt.agent.dcp_verify import verify
from memckpt.local import AgentProcess, read_events, start_torchrun, stop_process, torchrun_command, wait_until
from tests.integration.helpers import losses

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("persist_worker.py")
RANKS = 2


def start_agent(tmp_path: Path, shm_prefix: str, root: Path, name: str, *flags: str) -> AgentProcess:
    agent = AgentProcess(
        socket_path=tmp_path / f"{name}.sock",
        shm_prefix=shm_prefix,
        memory_limit="512MiB",
        log_path=tmp_path / f"{name}.log",
        extra_args=["--on-exit", "remove", "--persist-root", str(root), "--persist-rate", "0", *flags],
    )
    return agent.start()


def train(
    tmp_path: Path, job: str, socket: Path | None, steps: int, name: str, *, ranks: int = RANKS, init_from: Path | None = None
) -> list[dict]:
    """The bundled trainer under torchrun until `steps`; its events (memckpt off when `socket` is None)."""
    events = tmp_path / f"{name}.events"
    args = ["--job", job, "--steps", str(steps), "--preset", "tiny", "--seed", "7", "--events", str(events), "--threads", "1"]
    args += ["--socket", str(socket)] if socket else ["--snapshot-every", "0"]
    args += ["--init-from", str(init_from)] if init_from else []
    process = start_torchrun(torchrun_command(nproc=ranks, max_restarts=0, trainer_args=args), tmp_path / f"{name}.log")
    try:
        assert process.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        stop_process(process)
    return read_events(events)


def test_stock_dcp_loads_the_persisted_checkpoint_bit_exact_and_retention_keeps_the_newest(
    tmp_path: Path, shm_prefix: str
) -> None:
    root = tmp_path / "ckpt"
    agent = start_agent(tmp_path, shm_prefix, root, "agent", "--persist-every", "4", "--persist-keep", "2")
    try:
        train(tmp_path, "dcp", agent.socket_path, 12, "train")
        wait_until(lambda: 12 in {c.step for c in list_checkpoints(root, "dcp") if c.complete}, 60, "step 12 persisted")
        found = [(c.step, c.complete) for c in list_checkpoints(root, "dcp")]
        # keep=2 of steps 4, 8, 12: 8 and 12, or 4 and 12 when a rank skipped snapshot 8 (a slot
        # still kept for the filesystem), whose other rank's files retention removed as incomplete
        assert found in ([(8, True), (12, True)], [(4, True), (12, True)]), f"keep=2 of steps 4, 8, 12: {found}"
        out = tmp_path / "compare"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={RANKS}",
            str(WORKER),
            *("--job", "dcp", "--socket", str(agent.socket_path)),
            *("--checkpoint", str(root / "dcp" / "step-000000000012"), "--out", str(out)),
        ]
        worker = start_torchrun(command, tmp_path / "compare.log", env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert worker.wait(timeout=240) == 0, (tmp_path / "compare.log").read_text()[-3000:]
        finally:
            stop_process(worker)
        for rank in range(RANKS):
            report = json.loads((out / f"rank-{rank}.json").read_text())
            assert (report["memory_step"], report["source"]) == (12, "local")
            assert report["leaves"] > 10
            assert report["differences"] == [], f"rank {rank}: the checkpoint differs from memory at {report['differences']}"
    finally:
        agent.stop()
    check_cli_on(root, "dcp", [step for step, _ in found], tmp_path)


def memckpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memckpt.cli", *args], capture_output=True, text=True, timeout=120)


def check_cli_on(root: Path, job: str, steps: list[int], tmp_path: Path) -> None:
    """`memckpt list` (of the complete `steps`), then `verify` (intact, then with one flipped
    byte) and `export` on the newest checkpoint."""
    checkpoint = root / job / f"step-{steps[-1]:012d}"
    listed = memckpt("list", "--root", str(root), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["job"], r["step"], r["complete"]) for r in rows] == [(job, step, True) for step in steps]
    assert all(r["size_bytes"] > 0 for r in rows)
    table = memckpt("list", "--root", str(root))
    header, *lines = table.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "STEP", "STATE", "SIZE"] and len(lines) == 2 and "complete" in lines[1]
    verified = memckpt("verify", str(checkpoint))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
    assert f"verifying {checkpoint} [" in verified.stderr, "progress goes to stderr (a line when not at a terminal)"
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    data = damaged / "__1_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    broken = memckpt("verify", str(damaged), "--json")
    assert broken.returncode == 1, broken.stdout
    problems = json.loads(broken.stdout)["problems"]
    assert problems and any("__1_0.distcp" in p for p in problems), problems
    (damaged / ".metadata").unlink()
    incomplete = memckpt("verify", str(damaged))
    assert incomplete.returncode == 1 and "never finalized" in incomplete.stdout
    out = tmp_path / "export.pt"
    exported = memckpt("export", str(checkpoint), str(out))
    assert exported.returncode == 0, exported.stderr
    state = torch.load(out, weights_only=False)
    assert state["step"] == 12 and any(key.startswith("model") or key == "model" for key in state), list(state)[:5]
    refused = memckpt("export", str(damaged), str(tmp_path / "no.pt"))
    assert refused.returncode == 1 and "not a complete checkpoint" in refused.stderr
    assert not (tmp_path / "no.pt").exists()


def test_job_resumes_from_the_filesystem_when_memory_is_lost_bit_exact(tmp_path: Path, shm_prefix: str) -> None:
    root = tmp_path / "ckpt"
    reference = losses(train(tmp_path, "ref", None, 14, "reference"))
    agent = start_agent(tmp_path, shm_prefix, root, "agent", "--persist-every", "4")
    train(tmp_path, "fs", agent.socket_path, 10, "first")
    wait_until(lambda: 8 in {c.step for c in list_checkpoints(root, "fs") if c.complete}, 60, "step 8 persisted")
    agent.kill()  # the node's memory is gone: its agent and every segment it had
    for name in os.listdir("/dev/shm"):
        if name.startswith(shm_prefix):
            os.unlink(f"/dev/shm/{name}")
    agent = start_agent(tmp_path, shm_prefix, root, "agent2", "--persist-every", "4")
    try:
        events = train(tmp_path, "fs", agent.socket_path, 14, "second")
        ranks = agent_status(agent)["ranks"]
        assert sorted((r["rank"], r["restored_from"], r["restored_step"]) for r in ranks) == [
            (r, "filesystem", 8) for r in range(RANKS)
        ], "memckpt status says where each rank's state came from"
    finally:
        agent.stop()
    restores = [e for e in events if e["event"] == "restore"]
    assert sorted((e["rank"], e["step"], e["source"]) for e in restores) == [(r, 8, "filesystem") for r in range(RANKS)]
    resumed = losses(events)
    assert sorted(resumed) == list(range(9, 15))
    assert resumed == {s: reference[s] for s in range(9, 15)}, "the losses after the restore differ from the uninterrupted run"


def agent_status(agent: AgentProcess) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "memckpt.cli", "status", "--json", "--socket", str(agent.socket_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_agent_killed_mid_persist_leaves_nothing_loadable_torn_and_the_next_persist_succeeds(
    tmp_path: Path, shm_prefix: str
) -> None:
    root = tmp_path / "ckpt"
    slow = start_agent(tmp_path, shm_prefix, root, "slow", "--persist-every", "3", "--persist-rate", "64KiB")
    train(tmp_path, "torn", slow.socket_path, 4, "first")  # step 3 chosen; its files take seconds at 64 KiB/s
    step3 = root / "torn" / "step-000000000003"
    wait_until(step3.exists, 30, "the persist of step 3 to begin")
    slow.kill()  # SIGKILL in the middle of writing
    assert not (step3 / ".metadata").exists(), "step 3 was complete before the kill: the test proves nothing"
    assert [c.complete for c in list_checkpoints(root, "torn")] == [False]
    agent = start_agent(tmp_path, shm_prefix, root, "agent", "--persist-every", "3")  # adopts the memory
    try:
        events = train(tmp_path, "torn", agent.socket_path, 9, "second")
        assert [e["source"] for e in events if e["event"] == "restore"] == ["local"] * RANKS
        wait_until(lambda: any(c.complete for c in list_checkpoints(root, "torn")), 60, "a checkpoint after the restart")
    finally:
        agent.stop()
    found = list_checkpoints(root, "torn")
    assert found and all(c.complete for c in found), f"the torn step 3 was not cleaned up: {found}"
    assert 3 not in [c.step for c in found]
    for checkpoint in found:
        report = verify(checkpoint.path)
        assert report.is_ok, report.problems


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the checkpoint root needs root")
def test_a_full_disk_is_reported_training_goes_on_and_persistence_resumes_when_space_returns(
    tmp_path: Path, shm_prefix: str
) -> None:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(root)], check=True, timeout=30)
    agent = None
    try:
        agent = start_agent(tmp_path, shm_prefix, root, "agent", "--persist-every", "2")
        events = train(tmp_path, "full", agent.socket_path, 6, "first")
        assert max(e["step"] for e in events if e["event"] == "step") == 6, "training went on"
        wait_until(lambda: agent_status(agent)["persistence"], 30, "the persister to report")
        (job,) = agent_status(agent)["persistence"]
        assert job["failures"] > 0 and "No space left" in job["last_error"], job
        assert job["complete_step"] is None
        assert not any(c.complete for c in list_checkpoints(root, "full"))
        log_text = agent.log_path.read_text()
        assert "No space left on device" in log_text and "training goes on" in log_text
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True, timeout=30)  # space returns
        train(tmp_path, "full", agent.socket_path, 10, "second")
        wait_until(lambda: agent_status(agent)["persistence"][0]["complete_step"] is not None, 60, "a complete checkpoint")
        complete = [c for c in list_checkpoints(root, "full") if c.complete]
        assert complete and verify(complete[-1].path).is_ok
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["umount", "-l", str(root)], check=False, timeout=30)


def test_a_rank_death_persists_at_once_so_losing_the_node_later_loses_nothing(tmp_path: Path, shm_prefix: str) -> None:
    """No periodic persistence: only the breakpoint. A rank is SIGKILLed (torchrun then stops the
    other); the agent writes both ranks' newest snapshots at once and completes the checkpoint.
    Then the node goes too (agent killed, memory unlinked): the job resumes from that checkpoint."""
    root = tmp_path / "ckpt"
    reference = losses(train(tmp_path, "ref", None, 16, "reference"))
    agent = start_agent(tmp_path, shm_prefix, root, "agent")  # --persist-root only: persist at breakpoint
    events_path = tmp_path / "first.events"
    args = ["--job", "brk", "--steps", "200", "--preset", "tiny", "--seed", "7", "--events", str(events_path)]
    args += ["--threads", "1", "--socket", str(agent.socket_path), "--step-delay-s", "0.1"]
    process = start_torchrun(torchrun_command(nproc=RANKS, max_restarts=0, trainer_args=args), tmp_path / "first.log")
    try:
        wait_until(lambda: any(e["event"] == "step" and e["step"] >= 6 for e in read_events(events_path)), 120, "step 6")
        victim = next(e["pid"] for e in read_events(events_path) if e["event"] == "start" and e["rank"] == 1)
        os.kill(victim, signal.SIGKILL)
        assert process.wait(timeout=120) != 0
        steps = [e for e in read_events(events_path) if e["event"] == "step"]
        last = {r: max(e["step"] for e in steps if e["rank"] == r) for r in range(RANKS)}
        wait_until(lambda: any(c.complete for c in list_checkpoints(root, "brk")), 60, "the breakpoint checkpoint")
        saved = max((c for c in list_checkpoints(root, "brk") if c.complete), key=lambda c: c.step)
        # the newest step both ranks committed: a rank snapshots a step before it logs it (it logs
        # the loss after the all-reduce, where a rank whose partner died waits), so the slowest
        # rank's last logged step, or the one after it
        slowest = min(last.values())
        assert slowest - 1 <= saved.step <= slowest + 1, f"ranks got to {last}; persisted {saved.step}"
        assert "died: persisting its steps" in agent.log_path.read_text()
    finally:
        stop_process(process)
        agent.kill()  # then the node is lost: its agent and every segment it had
    for name in os.listdir("/dev/shm"):
        if name.startswith(shm_prefix):
            os.unlink(f"/dev/shm/{name}")
    agent = start_agent(tmp_path, shm_prefix, root, "agent2")
    try:
        events = train(tmp_path, "brk", agent.socket_path, 16, "second")
    finally:
        agent.stop()
    restores = [e for e in events if e["event"] == "restore"]
    assert sorted((e["rank"], e["step"], e["source"]) for e in restores) == [(r, saved.step, "filesystem") for r in range(RANKS)]
    resumed = losses(events)
    assert resumed == {s: reference[s] for s in range(saved.step + 1, 17)}


def test_a_checkpoint_of_4_ranks_resumes_the_bundled_trainer_on_3_ranks(tmp_path: Path, shm_prefix: str) -> None:
    """Resharding: persisted by 4 ranks, the job restarts at another world size (3: shards that
    do not divide evenly; test_dcp_format loads the same kind of checkpoint into 2 ranks too).
    memckpt restores it from the filesystem (its memory holds the 4-rank shards, which cannot
    load), and the losses then match a run that loads the same checkpoint with stock dcp.load
    (`--init-from`)."""
    root = tmp_path / "ckpt"
    agent = start_agent(tmp_path, shm_prefix, root, "agent", "--persist-every", "4")
    try:
        train(tmp_path, "rs", agent.socket_path, 5, "four", ranks=4)  # memory: steps 4, 5 of 4 ranks; disk: 4
        wait_until(lambda: 4 in [c.step for c in list_checkpoints(root, "rs") if c.complete], 60, "step 4 persisted")
        checkpoint = root / "rs" / "step-000000000004"
        events = train(tmp_path, "rs", agent.socket_path, 8, "memckpt-3", ranks=3)
        restores = sorted((e["rank"], e["step"], e["source"]) for e in events if e["event"] == "restore")
        assert restores == [(r, 4, "filesystem") for r in range(3)], "4-rank shards in memory cannot load"
        stock = train(tmp_path, "ref3", None, 8, "stock-3", ranks=3, init_from=checkpoint)
        assert sorted(losses(events)) == [5, 6, 7, 8]
        assert losses(events) == losses(stock), "3 ranks: memckpt's restore and stock dcp.load diverge"
        assert "taken at world size [4], not 3" in (tmp_path / "memckpt-3.log").read_text()
    finally:
        agent.stop()
