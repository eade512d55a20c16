"""`memckpt drain` with real processes: a node drained while a torchrun job trains can be lost,
with the hosts of the other ranks, and every rank still restores from memory, bit for bit; and
drains that cannot be done are refused with a precise reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memckpt.local import (
    CoordinatorProcess,
    LocalCluster,
    read_events,
    start_torchrun,
    stop_process,
    torchrun_command,
    wait_until,
)
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import token_metadata
from memckpt.trainer import Checkpointer

from .helpers import assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration

JOB = "drained"
STEPS = 36
K = 2  # the LocalCluster's k (m = 1)
DRAINED_HOST = 1  # rank 1's host: node1 holds one of rank 0's fragments (the rotation after node0: node1, node2, node3)
LOST_HOSTS = (1, 0, 2)  # the drained node, then the hosts of ranks 0 and 2 (rank 0's other fragment holder)


def memckpt(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "memckpt.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


def locate(cluster: LocalCluster, rank: int) -> list[cpb.SnapshotLocation]:
    with grpc.insecure_channel(cluster.coordinator.address) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.LocateSnapshots(
            cpb.LocateSnapshotsRequest(job=JOB, rank=rank), metadata=token_metadata(cluster.token), timeout=10
        )
    return list(reply.locations)


def fragment_holders(cluster: LocalCluster, rank: int) -> dict[int, set[str]]:
    """step -> the nodes holding fragments of the rank's step, for each step located with fragments."""
    return {loc.step: {f.node for f in loc.fragments} for loc in locate(cluster, rank) if loc.fragments}


def steps(path: Path, rank: int = 0) -> dict[int, str]:
    """Rank `rank`'s loss (hex) per step of a run."""
    return {e["step"]: e["loss_hex"] for e in read_events(path) if e["event"] == "step" and e["rank"] == rank}


def test_a_drained_node_and_the_other_ranks_hosts_are_lost_and_every_rank_restores_from_memory(
    tmp_path: Path, shm_prefix: str
) -> None:
    cluster = LocalCluster(workdir=tmp_path, nodes=5, memory_limit="256MiB", shm_prefix=shm_prefix, token=uuid.uuid4().hex)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start()
        coordinator = ("--coordinator", cluster.coordinator.address, "--token", cluster.token)
        common = ["--preset", "tiny", "--seed", "7", "--steps", str(STEPS), "--socket", str(cluster.socket_template)]
        events, reference, resumed = tmp_path / "run.events", tmp_path / "reference.events", tmp_path / "resumed.events"
        # the uninterrupted reference (memckpt off), beside the job: the job mostly sleeps between steps
        command = torchrun_command(
            nproc=3, max_restarts=0, trainer_args=[*common, "--job", "ref", "--snapshot-every", "0", "--events", str(reference)]
        )
        processes.append(start_torchrun(command, tmp_path / "reference.log"))
        command = torchrun_command(
            nproc=3, max_restarts=0, trainer_args=[*common, "--job", JOB, "--events", str(events), "--step-delay-s", "0.4"]
        )
        job = start_torchrun(command, tmp_path / "run.log")
        processes.append(job)

        # before the drain: rank 0's fragments are on the node to drain and on rank 2's host
        drained = cluster.node_names[DRAINED_HOST]
        lost = {cluster.node_names[h] for h in LOST_HOSTS}
        wait_until(
            lambda: any(drained in h for h in fragment_holders(cluster, 0).values()), 120, f"rank 0's fragments on {drained}"
        )
        before = fragment_holders(cluster, 0)
        assert all(len(holders - lost) < K for holders in before.values()), (
            f"without the drain, losing {sorted(lost)} (rank 0's whole copy and two of its fragment holders) "
            f"would leave fewer than k={K} fragments of rank 0: {before}"
        )

        done = memckpt("drain", drained, *coordinator, "--timeout-s", "90")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{drained} is drained: it holds nothing others need; it can be stopped" in done.stdout
        assert job.poll() is None and max(steps(events)) < STEPS, "drained while the job trains"

        # a second drain would leave 3 agents, too few for a group of k+m+1 = 4: refused, precisely
        refused = memckpt("drain", cluster.node_names[4], *coordinator)
        assert refused.returncode == 2 and "would leave 3 agent(s) to hold fragments" in refused.stderr, refused.stderr
        status = json.loads(memckpt("status", *coordinator, "--json").stdout)
        (agent,) = [a for a in status["agents"] if a["node"] == drained]
        assert agent["draining"] and agent["drain"]["fragment_sets_held"] == 0 and agent["drain"]["ranks_protected"] == 1

        # after it: every rank has a step whose fragments survive the loss of all three nodes
        for rank in range(3):
            holders = fragment_holders(cluster, rank)
            assert any(len(h - lost) >= K for h in holders.values()), f"rank {rank}: {holders}"

        ranks = {e["rank"]: e["pid"] for e in read_events(events) if e["event"] == "start"}
        for host in LOST_HOSTS:  # the nodes go with their ranks (torchrun's workers run in sessions of their own)
            cluster.lose_node(host)
            os.kill(ranks[host], signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        stopped_at = max(steps(events))
        assert stopped_at < STEPS
        alive = {cluster.node_names[h] for h in (3, 4)}
        wait_until(lambda: {a.agent.node for a in cluster.cluster_status().agents if a.alive} == alive, 30, "the losses seen")
        for host in LOST_HOSTS:
            cluster.replace_node(host)
        wait_until(lambda: len(cluster.grouped_nodes()) == 5, 60, "the replacements in a group")

        command = torchrun_command(nproc=3, max_restarts=0, trainer_args=[*common, "--job", JOB, "--events", str(resumed)])
        restart = start_torchrun(command, tmp_path / "resumed.log")
        processes.append(restart)
        assert restart.wait(timeout=180) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        assert processes[0].wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-3000:]

        restores = [e for e in read_events(resumed) if e["event"] == "restore"]
        assert sorted(e["rank"] for e in restores) == [0, 1, 2]
        assert {e["source"] for e in restores} == {"fragments"}, "every rank's node was lost: all come from peers"
        (restored,) = {e["step"] for e in restores}
        assert 0 < restored <= stopped_at
        expected = steps(reference)
        ran, resumed_losses = steps(events), steps(resumed)
        assert min(resumed_losses) == restored + 1 and max(resumed_losses) == STEPS
        assert {s: ran[s] for s in ran} == {s: expected[s] for s in ran}, "the first run matches the reference"
        mismatched = sorted(s for s in resumed_losses if resumed_losses[s] != expected[s])
        assert not mismatched, f"losses differ from the uninterrupted run at steps {mismatched}"
    finally:
        for process in processes:
            stop_process(process)
        cluster.stop()


def test_a_job_standing_still_is_protected_again_without_the_drained_node(tmp_path: Path, shm_prefix: str) -> None:
    """One commit, then nothing (a paused job): the drain still moves its fragment off the node."""
    cluster = LocalCluster(workdir=tmp_path, nodes=5, memory_limit="256MiB", shm_prefix=shm_prefix, token=uuid.uuid4().hex)
    try:
        cluster.start()
        state = make_state(4, 1 << 16)
        with Checkpointer(JOB, rank=0, world_size=1, socket_path=cluster.socket_of(0), strict=True) as ck:
            ck.snapshot(4, state)
            ck.wait()
        wait_until(lambda: {"node1", "node2", "node3"} in fragment_holders(cluster, 0).values(), 30, "step 4 protected")
        done = memckpt("drain", "node1", "--coordinator", cluster.coordinator.address, "--token", cluster.token, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["result"] == "drained" and report["status"]["fragment_sets_held"] == 0
        assert fragment_holders(cluster, 0) == {4: {"node4", "node2", "node3"}}, "node1's fragment moved to node4"
        for host in (1, 0, 2):  # beyond what one parity survives, but for the drain
            cluster.lose_node(host)
        replacement = cluster.replace_node(0)
        alive = {"node3", "node4", replacement}
        wait_until(lambda: {a.agent.node for a in cluster.cluster_status().agents if a.alive} == alive, 30, "the losses seen")
        restored = empty_like_state(1 << 16)
        with Checkpointer(JOB, rank=0, world_size=1, socket_path=cluster.socket_of(0), strict=True) as ck:
            assert ck.restore(restored, coordinate=False) == 4 and ck.restored_from == "fragments"
        assert_state_equal({**restored, "step": 4}, state)
    finally:
        cluster.stop()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(
        workdir=tmp_path, extra_args=["--lease-s", "60", "--heartbeat-interval-s", "1", "--token", "t0k"]
    )
    try:
        process.start()
        yield process
    finally:
        assert process.stop() == 0, f"see {process.log_path}"


def register(coordinator: CoordinatorProcess, *nodes: str, held: tuple[cpb.HeldSnapshot, ...] = ()) -> None:
    """Agents as the coordinator sees them (leases of 60 s), without processes behind them."""
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = cpb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
        for node in nodes:
            agent = cpb.AgentDescription(
                node=node, address=f"127.0.0.1:{9000 + ord(node[0])}", capacity_bytes=1 << 30, domain=node
            )
            request = cpb.RegisterAgentRequest(agent=agent, held=held, instance_id=1)
            stub.RegisterAgent(request, metadata=token_metadata("t0k"), timeout=10)


def test_drains_that_cannot_be_done_are_refused_precisely_and_undo_ends_one(coordinator: CoordinatorProcess) -> None:
    target = ("--coordinator", coordinator.address, "--token", "t0k")
    register(coordinator, "a", "b", "c", "d")

    def run(*args: str) -> tuple[int, str, str]:
        done = memckpt(*args, *target, timeout_s=60)
        return done.returncode, done.stdout, done.stderr

    code, _, err = run("drain", "nodeX")
    assert code == 2
    assert "refused: no agent named 'nodeX' has registered with this coordinator (known: a, b, c, d)" in err
    code, _, err = run("drain", "a")
    assert code == 2 and "draining a would leave 3 agent(s) to hold fragments (b, c, d)" in err
    assert "a protection group needs 4 (k=2, m=1)" in err
    code, out, _ = run("drain", "../a", "--json")
    assert code == 2 and json.loads(out)["result"] == "refused"

    fragment = cpb.HeldSnapshot(job="j", rank=0, step=5, generation=1, fragment_indices=[2], k=2, m=1, size_bytes=64)
    register(coordinator, "e", held=(fragment,))  # holds a fragment of a's rank 0
    code, out, _ = run("drain", "e", "--no-wait", "--json")
    started = json.loads(out)
    assert code == 0 and started["result"] == "started" and started["status"]["draining"]
    code, out, _ = run("drain", "e", "--no-wait")
    assert code == 0 and out.startswith("e was being drained already")
    code, _, err = run("drain", "d")
    assert code == 2 and "draining d would leave 3 agent(s)" in err, "e's drain counts: a, b, c would be left"
    table = memckpt("status", *target).stdout.splitlines()
    assert any(line.split()[:2] == ["e", "DRAINING"] for line in table), table
    (why,) = [line for line in table if line.startswith("  e: ")]
    assert "1 fragment set(s) of other nodes' ranks still held (job 'j' rank 0 step 5)" in why, table
    code, out, _ = run("drain", "e", "--undo")
    assert code == 0 and "drain of e undone" in out
    code, _, err = run("drain", "e", "--undo")
    assert code == 2 and "e is not being drained: there is nothing to undo" in err
    report: dict[str, Any] = json.loads(memckpt("status", *target, "--json").stdout)
    assert not any(a["draining"] for a in report["agents"])
