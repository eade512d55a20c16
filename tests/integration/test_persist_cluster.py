"""Beyond memory's tolerance: more nodes of a group are lost than its parity covers, and the job
resumes from the newest complete checkpoint its agents persisted, bit for bit.

A coordinator and 5 agents (one per simulated node, `memckpt.local.LocalCluster`) share one
checkpoint root, as nodes share a parallel filesystem; a 2-rank torchrun job trains with a
snapshot every step, protected with k=2, m=1, and persisted every 4 steps (each agent writes
the ranks it holds; the agent of rank 0 writes the metadata once every rank's files are there).
Then rank 0's node and two of its three fragment holders are lost at once.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from memckpt.agent.checkpoints import list_checkpoints
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.local import LocalCluster, read_events, start_torchrun, stop_process, torchrun_command, wait_until
from tests.integration.helpers import losses

pytestmark = pytest.mark.integration
RANKS = 2


def train(tmp_path: Path, socket: Path | None, steps: int, name: str) -> list[dict]:
    events = tmp_path / f"{name}.events"
    args = ["--job", "wide", "--steps", str(steps), "--preset", "tiny", "--seed", "3", "--events", str(events)]
    args += ["--threads", "1", "--step-delay-s", "0.05"]
    args += ["--socket", str(socket)] if socket else ["--snapshot-every", "0"]
    process = start_torchrun(torchrun_command(nproc=RANKS, max_restarts=0, trainer_args=args), tmp_path / f"{name}.log")
    try:
        assert process.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        stop_process(process)
    return read_events(events)


def test_losing_more_nodes_than_parity_covers_resumes_from_the_persisted_checkpoint(tmp_path: Path, shm_prefix: str) -> None:
    root = tmp_path / "shared-fs"
    reference = losses(train(tmp_path, None, 14, "reference"))
    cluster = LocalCluster(
        workdir=tmp_path,
        nodes=5,
        memory_limit="256MiB",
        shm_prefix=shm_prefix,
        token=secrets.token_hex(8),
        agent_args=["--persist-root", str(root), "--persist-every", "4", "--persist-rate", "0"],
    )
    try:
        cluster.start()
        train(tmp_path, cluster.socket_template, 10, "first")
        wait_until(lambda: 8 in [c.step for c in list_checkpoints(root, "wide") if c.complete], 60, "step 8 persisted")
        nodes = tuple(sorted(cluster.node_names))
        doomed = ["node0", *choose_fragment_holders("node0", nodes, 3)[:2]]  # rank 0's owner and 2 of 3 holders
        hosts = [cluster.node_names.index(node) for node in doomed]
        for host in hosts:
            cluster.lose_node(host)
        for host in hosts:
            cluster.replace_node(host)
        wait_until(lambda: not set(doomed) & set(alive(cluster)), 30, "the lost nodes to be declared failed")
        events = train(tmp_path, cluster.socket_template, 14, "second")
    finally:
        cluster.stop()
    restores = sorted((e["rank"], e["step"], e["source"]) for e in events if e["event"] == "restore")
    assert {step for _, step, _ in restores} == {8} and len(restores) == RANKS, restores
    assert restores[0] == (0, 8, "filesystem"), "rank 0's fragments are beyond repair: the filesystem"
    assert all(source in ("filesystem", "fragments") for _, _, source in restores[1:]), (
        "the other ranks take step 8 from memory where their fragments survived, else from the filesystem"
    )
    assert losses(events) == {s: reference[s] for s in range(9, 15)}, "the losses after the restore differ"
    replacement_log = (tmp_path / f"{cluster.node_names[0]}.log").read_text()
    assert "memory cannot restore the job" in replacement_log, "the agent says why it took the filesystem"


def alive(cluster: LocalCluster) -> list[str]:
    return [a.agent.node for a in cluster.cluster_status().agents if a.alive]
