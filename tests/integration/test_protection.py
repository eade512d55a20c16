"""A commit is erasure-coded and sent to its group in the background, then reported protected."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import grpc
import pytest
import torch

from memckpt.agent.erasure import Scheme, decode
from memckpt.agent.fragments import fragment_prefix
from memckpt.agent.peers import PeerClient
from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.local import AgentProcess, wait_until
from memckpt.protos import agent_pb2 as apb
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import TlsFiles, token_metadata
from memckpt.trainer import Checkpointer

from .helpers import agent_stub, assert_state_equal, make_state
from .test_peer_fragments import NODES, TOKEN, Cluster, cluster  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def protected_step(of: Cluster, job: str, rank: int) -> int:
    with grpc.insecure_channel(of.coordinator.address) as channel:
        status = cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
            cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
        )
    for job_status in status.jobs:
        for r in job_status.ranks:
            if job_status.job == job and r.rank == rank:
                return int(r.protected_step)
    return -1


def alive_nodes(of: Cluster) -> list[str]:
    with grpc.insecure_channel(of.coordinator.address) as channel:
        status = cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
            cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
        )
    return sorted(a.agent.node for a in status.agents if a.alive)


def committed_bytes(of: Cluster, node: str, job: str) -> bytes:
    channel, stub = agent_stub(of.agents[node].socket_path)
    with channel:
        status = stub.GetStatus(apb.GetStatusRequest(), timeout=10)
    rank = next(r for r in status.ranks if r.job == job)
    slot = next(s for s in rank.slots if s.state == apb.SLOT_STATE_COMMITTED and s.step == rank.committed_step)
    return (DEFAULT_ROOT / slot.name).read_bytes()[: slot.data_size_bytes]


def test_commit_is_sent_to_its_group_and_any_k_fragments_rebuild_it(cluster: Cluster) -> None:  # noqa: F811
    with Checkpointer("prot", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(7, make_state(7, 1 << 18))
        ck.wait()
    wait_until(lambda: protected_step(cluster, "prot", 0) == 7, 30, "step 7 to be reported protected")
    expected = committed_bytes(cluster, "node0", "prot")
    addresses = cluster.addresses()
    holders = choose_fragment_holders("node0", tuple(sorted(NODES)), 3)
    assert "node0" not in holders, "an owner never holds its own fragments"
    peers = PeerClient(token=TOKEN, tls=TlsFiles())
    try:
        fetched = {i: peers.get_fragment(addresses[h], "prot", 0, i, 7) for i, h in enumerate(holders)}
    finally:
        peers.close()
    fragments = {i: data for i, (_, data) in fetched.items()}
    channel, stub = agent_stub(cluster.agents["node0"].socket_path)
    with channel:
        meta = stub.OpenRestore(apb.OpenRestoreRequest(job="prot", rank=0), timeout=30).meta
    assert all(header.meta.encode() == meta for header, _ in fetched.values()), "every holder has the layout"
    scheme = Scheme(k=2, m=1, size_bytes=len(expected))
    for chosen in itertools.combinations(range(3), 2):
        assert bytes(decode({i: fragments[i] for i in chosen}, scheme)) == expected, f"fragments {chosen}"


def test_newest_step_is_protected_when_snapshots_outpace_peers(cluster: Cluster) -> None:  # noqa: F811
    with Checkpointer("fast", rank=0, world_size=1, socket_path=cluster.agents["node1"].socket_path) as ck:
        for step in range(1, 21):
            ck.snapshot(step, make_state(step, 1 << 18))
        ck.wait()
        committed = ck.stats.snapshots_committed
        skipped = ck.stats.failures["Unavailable"]
    assert committed + skipped == 20, "each snapshot either committed or was skipped while its slot was being sent"
    channel, stub = agent_stub(cluster.agents["node1"].socket_path)
    with channel:
        newest = next(r for r in stub.GetStatus(apb.GetStatusRequest(), timeout=10).ranks if r.job == "fast").committed_step
    assert newest >= 19
    wait_until(lambda: protected_step(cluster, "fast", 0) == newest, 30, "the newest step to be protected")


def shm_prefix_of(of: Cluster, node: str) -> str:
    args = of.agent_args[node]
    return args[args.index("--shm-prefix") + 1]


def lose_and_replace(cluster: Cluster, agent_factory, lost: tuple[str, ...]) -> AgentProcess:  # noqa: ANN001, F811
    """Loses whole nodes (agent killed, shared memory gone) and starts node5 in node0's place."""
    for node in lost:
        cluster.agents[node].kill()
        for path in DEFAULT_ROOT.iterdir():
            if path.name.startswith(shm_prefix_of(cluster, node)[:-1]):  # its slots and its fragments
                path.unlink()
    args = dict(zip(cluster.agent_args["node4"][::2], cluster.agent_args["node4"][1::2]))
    prefix = shm_prefix_of(cluster, "node0").replace("node0", "node5")
    args.update({"--node": "node5", "--domain": "rack5", "--shm-prefix": prefix})
    replacement: AgentProcess = agent_factory(name="node5", extra_args=tuple(x for kv in args.items() for x in kv))
    cluster.agents["node5"] = replacement  # stopped, and its shared memory checked, with the others
    wait_until(lambda: set(alive_nodes(cluster)) == set(NODES) - set(lost) | {"node5"}, 30, "node5 to replace the lost")
    return replacement


def zeros_like_state() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model": {"w": torch.zeros(1 << 18), "b": torch.zeros(64)},
        "optim": {"m": torch.zeros(1 << 17), "step": torch.tensor(0)},
    }


def test_lost_node_is_restored_on_a_replacement_from_its_peers_fragments(cluster: Cluster, agent_factory) -> None:  # noqa: ANN001, F811
    state = make_state(4, 1 << 18)
    with Checkpointer("loss", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(4, state)
        ck.wait()
    wait_until(lambda: protected_step(cluster, "loss", 0) == 4, 30, "step 4 to be protected")
    holders = choose_fragment_holders("node0", tuple(sorted(NODES)), 3)
    replacement = lose_and_replace(cluster, agent_factory, ("node0",))
    restored = zeros_like_state()
    with Checkpointer("loss", rank=0, world_size=1, socket_path=replacement.socket_path, strict=True) as ck:
        assert ck.restore(restored, coordinate=False) == 4
        assert ck.restored_from == "fragments"
    assert_state_equal(restored, state)
    # the trainer fetched the data fragments from their holders itself: the new node holds no slot for it
    log = replacement.log_path.read_text()
    assert f"direct restore of job=loss rank=0 step=4: the trainer fetches fragments [0, 1] from {list(holders[:2])}" in log
    assert "rebuilt job=loss" not in log
    channel, stub = agent_stub(replacement.socket_path)
    with channel:
        assert not [r for r in stub.GetStatus(apb.GetStatusRequest(), timeout=10).ranks if r.job == "loss"]


def test_a_corrupted_fragment_fails_the_checksums_and_the_others_rebuild_the_rank(
    cluster: Cluster,  # noqa: F811
    agent_factory,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A holder's fragment 0 rots in memory: the trainer's direct fetch fails the owner's
    checksums, and the replacement agent, asked again, finds fragment 0 corrupt by its crc and
    rebuilds the rank from fragments 1 and 2 (the parity). Nothing corrupt is loaded."""
    state = make_state(4, 1 << 18)
    with Checkpointer("rot", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(4, state)
        ck.wait()
    wait_until(lambda: protected_step(cluster, "rot", 0) == 4, 30, "step 4 to be protected")
    holder = choose_fragment_holders("node0", tuple(sorted(NODES)), 3)[0]
    prefix = fragment_prefix(shm_prefix_of(cluster, holder))
    names = sorted(p.name for p in DEFAULT_ROOT.iterdir())
    found = [DEFAULT_ROOT / n for n in names if n.startswith(f"{prefix}rot.r0.f0.s4.")]
    assert len(found) == 1, (prefix, names)
    segment = found[0]
    with segment.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x5A]))
    replacement = lose_and_replace(cluster, agent_factory, ("node0",))
    restored = zeros_like_state()
    with caplog.at_level(logging.WARNING, logger="memckpt.trainer"):
        with Checkpointer("rot", rank=0, world_size=1, socket_path=replacement.socket_path, strict=True) as ck:
            assert ck.restore(restored, coordinate=False) == 4
    assert_state_equal(restored, state)
    assert "direct restore job=rot rank=0 step=4 failed; the agent rebuilds it" in caplog.text
    assert "do not match the owner's checksums" in caplog.text
    log = replacement.log_path.read_text()
    assert f"fragment 0 of job=rot rank=0 from {holder} unusable" in log
    assert "rebuilt job=rot rank=0 step=4 from fragments [1, 2]" in log


def test_beyond_tolerance_memory_says_it_cannot_restore_and_restores_nothing(cluster: Cluster, agent_factory) -> None:  # noqa: ANN001, F811
    from memckpt.errors import CorruptSnapshot

    with Checkpointer("gone", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(4, make_state(4, 1 << 18))
        ck.wait()
    wait_until(lambda: protected_step(cluster, "gone", 0) == 4, 30, "step 4 to be protected")
    holders = choose_fragment_holders("node0", tuple(sorted(NODES)), 3)
    replacement = lose_and_replace(cluster, agent_factory, ("node0", *holders[:2]))  # the owner and m+1 = 2 holders
    assert alive_nodes(cluster) == ["node3", "node4", "node5"]
    target = zeros_like_state()
    with Checkpointer("gone", rank=0, world_size=1, socket_path=replacement.socket_path, strict=True) as ck:
        with pytest.raises(CorruptSnapshot, match="memory cannot restore the job") as info:
            ck.restore(target, coordinate=False)
    assert "node0" in str(info.value)
    assert not target["model"]["w"].any(), "nothing partial is restored"


def test_coordinator_kill9_training_goes_on_and_protection_resumes(cluster: Cluster) -> None:  # noqa: F811
    socket_path = cluster.agents["node2"].socket_path
    with Checkpointer("coord", rank=0, world_size=1, socket_path=socket_path, strict=True) as ck:
        ck.snapshot(1, make_state(1, 1 << 16))
        ck.wait()
        wait_until(lambda: protected_step(cluster, "coord", 0) == 1, 30, "step 1 to be protected")
        cluster.coordinator.kill()
        ck.snapshot(2, make_state(2, 1 << 16))  # the coordinator is gone: snapshots go on
        assert ck.wait().committed
        cluster.coordinator.start()  # same port: its state is rebuilt from the agents' reports
        wait_until(lambda: protected_step(cluster, "coord", 0) == 2, 30, "step 2 to be protected after the restart")
    wait_until(lambda: sorted(cluster.addresses()) == list(NODES), 30, "every agent to register again")


def test_release_drops_the_job_on_every_node_and_a_restart_starts_fresh(cluster: Cluster) -> None:  # noqa: F811
    """`memckpt release` on the owner's node: every agent drops its slots and fragments of the
    job (their shared memory goes), another job stays protected, and the job started again
    under the same name starts fresh instead of restoring what was released."""
    prefixes = tuple(shm_prefix_of(cluster, node).removesuffix(".") for node in NODES)

    def shm_of(job: str) -> list[str]:
        return sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(prefixes) and f".{job}.r" in p.name)

    for job, node in (("done", "node0"), ("running", "node1")):
        with Checkpointer(job, rank=0, world_size=1, socket_path=cluster.agents[node].socket_path, strict=True) as ck:
            ck.snapshot(3, make_state(3, 1 << 18))
            ck.wait()
        wait_until(lambda job=job: protected_step(cluster, job, 0) == 3, 30, f"{job} step 3 to be protected")
    holding = {name.split(".")[0] for name in shm_of("done")}
    assert len(holding) >= 4, f"node0's slots and three holders' fragments: {shm_of('done')}"
    running = shm_of("running")
    socket = str(cluster.agents["node0"].socket_path)
    released = subprocess.run(
        [sys.executable, "-m", "memckpt.cli", "release", "done", "--socket", socket], capture_output=True, text=True, timeout=60
    )
    assert released.returncode == 0, released.stderr
    assert "1 rank(s)" in released.stdout and "4 node(s) held slots or fragments" in released.stdout, released.stdout
    wait_until(lambda: shm_of("done") == [], 15, "every node to drop the released job")
    assert shm_of("running") == running and protected_step(cluster, "running", 0) == 3, "the other job is untouched"
    with grpc.insecure_channel(cluster.coordinator.address) as channel:
        status = cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
            cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
        )
    assert sorted(j.job for j in status.jobs) == ["running"]
    again = subprocess.run(
        [sys.executable, "-m", "memckpt.cli", "release", "done", "--socket", socket], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "released already" in again.stderr, again.stderr
    with Checkpointer("done", rank=0, world_size=1, socket_path=cluster.agents["node2"].socket_path, strict=True) as ck:
        assert ck.restore(make_state(0, 1 << 18)) is None, "released: never restored from, on any node"
