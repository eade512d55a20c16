"""A commit is erasure-coded and sent to its group in the background, then reported protected."""

from __future__ import annotations

import itertools

import grpc
import pytest
import torch

from memckpt.agent.erasure import Scheme, decode
from memckpt.agent.peers import PeerClient
from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.local import wait_until
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


def test_lost_node_is_restored_on_a_replacement_from_its_peers_fragments(cluster: Cluster, agent_factory) -> None:  # noqa: ANN001, F811
    state = make_state(4, 1 << 18)
    with Checkpointer("loss", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(4, state)
        ck.wait()
    wait_until(lambda: protected_step(cluster, "loss", 0) == 4, 30, "step 4 to be protected")
    lost = cluster.agents["node0"]
    lost.kill()  # the whole node: its agent and its shared memory
    for path in DEFAULT_ROOT.iterdir():
        if path.name.startswith(lost.shm_prefix[:-1]):
            path.unlink()
    args = dict(zip(cluster.agent_args["node4"][::2], cluster.agent_args["node4"][1::2]))
    args.update({"--node": "node5", "--domain": "rack5", "--shm-prefix": lost.shm_prefix.replace("node0", "node5")})
    replacement = agent_factory(name="node5", extra_args=tuple(x for kv in args.items() for x in kv))
    wait_until(lambda: "node5" in cluster.addresses() and "node0" not in cluster.addresses(), 30, "node5 to replace node0")
    restored = {
        "model": {"w": torch.zeros(1 << 18), "b": torch.zeros(64)},
        "optim": {"m": torch.zeros(1 << 17), "step": torch.tensor(0)},
    }
    with Checkpointer("loss", rank=0, world_size=1, socket_path=replacement.socket_path, strict=True) as ck:
        assert ck.restore(restored, coordinate=False) == 4
    assert_state_equal(restored, state)


def test_beyond_tolerance_memory_says_it_cannot_restore_and_restores_nothing(cluster: Cluster, agent_factory) -> None:  # noqa: ANN001, F811
    from memckpt.errors import CorruptSnapshot

    with Checkpointer("gone", rank=0, world_size=1, socket_path=cluster.agents["node0"].socket_path, strict=True) as ck:
        ck.snapshot(4, make_state(4, 1 << 18))
        ck.wait()
    wait_until(lambda: protected_step(cluster, "gone", 0) == 4, 30, "step 4 to be protected")
    holders = choose_fragment_holders("node0", tuple(sorted(NODES)), 3)
    for node in ("node0", *holders[:2]):  # the owner and m+1 = 2 of its 3 fragment holders
        cluster.agents[node].kill()
        for path in DEFAULT_ROOT.iterdir():
            if path.name.startswith(cluster.agents[node].shm_prefix[:-1]):
                path.unlink()
    args = dict(zip(cluster.agent_args["node4"][::2], cluster.agent_args["node4"][1::2]))
    args.update(
        {"--node": "node5", "--domain": "rack5", "--shm-prefix": cluster.agents["node0"].shm_prefix.replace("node0", "node5")}
    )
    replacement = agent_factory(name="node5", extra_args=tuple(x for kv in args.items() for x in kv))
    wait_until(lambda: alive_nodes(cluster) == ["node3", "node4", "node5"], 30, "node5 to join and the lost nodes to fail")
    target = {
        "model": {"w": torch.zeros(1 << 18), "b": torch.zeros(64)},
        "optim": {"m": torch.zeros(1 << 17), "step": torch.tensor(0)},
    }
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
