"""Bad requests get precise gRPC errors, and the agent keeps serving everyone else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
import torch

from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.errors import BudgetExceeded
from memckpt.local import wait_until
from memckpt.protos import agent_pb2 as pb
from memckpt.trainer import Checkpointer

from .helpers import agent_stub, assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration


def code_of(call, request) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code(), info.value.details()


def test_over_budget_registration_is_refused_with_sizes(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory(memory_limit="64MiB")
    channel, stub = agent_stub(agent.socket_path)
    with channel:
        code, details = code_of(
            stub.RegisterRank, pb.RegisterRankRequest(job="big", rank=0, world_size=1, slot_size_bytes=40 << 20)
        )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "job 'big' rank 0" in details and "80.0 MiB" in details and "64.0 MiB budget" in details


@pytest.mark.parametrize(
    "request_",
    [
        pb.RegisterRankRequest(job="a/b", rank=0, world_size=1, slot_size_bytes=1024),
        pb.RegisterRankRequest(job="..", rank=0, world_size=1, slot_size_bytes=1024),
        pb.RegisterRankRequest(job="", rank=0, world_size=1, slot_size_bytes=1024),
        pb.RegisterRankRequest(job="ok", rank=-1, world_size=1, slot_size_bytes=1024),
        pb.RegisterRankRequest(job="ok", rank=2, world_size=2, slot_size_bytes=1024),
        pb.RegisterRankRequest(job="ok", rank=0, world_size=1, slot_size_bytes=0),
    ],
)
def test_malformed_registrations_are_invalid_argument(agent_factory, request_) -> None:  # noqa: ANN001
    agent = agent_factory()
    channel, stub = agent_stub(agent.socket_path)
    with channel:
        code, details = code_of(stub.RegisterRank, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def test_unknown_job_rank_and_bad_commits_get_precise_codes(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory(extra_args=("--max-message-bytes", "1MiB"))
    channel, stub = agent_stub(agent.socket_path)
    with channel:
        assert (
            code_of(stub.BeginSnapshot, pb.BeginSnapshotRequest(job="nope", rank=0, step=1, size_bytes=10))[0]
            == grpc.StatusCode.NOT_FOUND
        )
        assert code_of(stub.OpenRestore, pb.OpenRestoreRequest(job="nope", rank=3))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(stub.ReleaseJob, pb.ReleaseJobRequest(job="nope"))[0] == grpc.StatusCode.NOT_FOUND
        stub.RegisterRank(pb.RegisterRankRequest(job="j", rank=0, world_size=1, slot_size_bytes=4096), timeout=10)
        grant = stub.BeginSnapshot(pb.BeginSnapshotRequest(job="j", rank=0, step=5, size_bytes=4096), timeout=10)

        def commit(**kw: object) -> pb.CommitSnapshotRequest:
            fields = {"job": "j", "rank": 0, "step": 5, "slot_index": grant.slot_index, "data_size_bytes": 10, **kw}
            return pb.CommitSnapshotRequest(**fields)

        assert code_of(stub.CommitSnapshot, commit(slot_index=9))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(stub.CommitSnapshot, commit(step=6))[0] == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(stub.CommitSnapshot, commit(data_size_bytes=1 << 40))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(stub.CommitSnapshot, commit(meta=b"x" * (2 << 20)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            code_of(stub.BeginSnapshot, pb.BeginSnapshotRequest(job="j", rank=0, step=4, size_bytes=10))[0]
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        assert code_of(stub.OpenRestore, pb.OpenRestoreRequest(job="j", rank=0, step=77))[0] == grpc.StatusCode.NOT_FOUND
        garbage = channel.unary_unary(
            "/memckpt.v1.AgentService/RegisterRank", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() != grpc.StatusCode.OK
        stub.CommitSnapshot(commit(), timeout=10)  # the right commit still lands after all that


def test_agent_keeps_serving_others_after_bad_requests(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    channel, stub = agent_stub(agent.socket_path)
    with channel:
        for job in ("../etc", "a/b", "x" * 100):
            code_of(stub.RegisterRank, pb.RegisterRankRequest(job=job, rank=0, world_size=1, slot_size_bytes=1024))
    state = make_state(3)
    with Checkpointer("good", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        ck.snapshot(3, state)
        ck.wait()
        restored = empty_like_state()
        assert ck.restore(restored) == 3
    assert_state_equal(restored, state)


def agent_status_checksummed(socket_path: Path) -> bool:
    channel, stub = agent_stub(socket_path)
    with channel:
        ranks = stub.GetStatus(pb.GetStatusRequest(), timeout=10).ranks
    return all(s.checksum_ready for r in ranks for s in r.slots if s.state == pb.SLOT_STATE_COMMITTED)


def test_socket_and_segments_are_private_to_the_user(agent_factory, shm_prefix) -> None:  # noqa: ANN001
    agent = agent_factory()
    assert stat.S_IMODE(os.stat(agent.socket_path).st_mode) == 0o600
    with Checkpointer("priv", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        ck.snapshot(1, make_state(1))
        ck.wait()
    # the background checksum rewrites the manifest (write a .tmp, rename): wait until it is done
    wait_until(lambda: agent_status_checksummed(agent.socket_path), 30, "the commit to be checksummed")
    segments = [p for p in DEFAULT_ROOT.iterdir() if p.name.startswith(shm_prefix) and not p.name.endswith(".tmp")]
    assert len(segments) == 3  # two slots and the manifest
    for path in segments:
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid(), path
        assert path.name.startswith(f"{shm_prefix}priv."), "segment names carry the job"


def test_over_budget_snapshot_is_counted_and_training_goes_on(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory(memory_limit="1MiB")
    with Checkpointer("huge", rank=0, world_size=1, socket_path=agent.socket_path) as ck:
        ck.snapshot(1, make_state(1))  # two slots of ~384 KiB fit in 1 MiB
        assert ck.wait().committed
        handle = ck.snapshot(2, {"w": torch.zeros(1 << 20)})  # 4 MiB does not: refused, not raised
        assert isinstance(handle.error, BudgetExceeded) and "1.0 MiB budget" in str(handle.error)
        assert ck.stats.failures["BudgetExceeded"] == 1
        ck.snapshot(3, make_state(3))  # training goes on, and so do snapshots that fit
        assert ck.wait().committed
        restored = empty_like_state()
        assert ck.restore(restored) == 3
    assert_state_equal(restored, make_state(3))


def test_longest_job_name_with_a_long_prefix_works(tmp_path, shm_prefix) -> None:  # noqa: ANN001
    from memckpt.local import AgentProcess

    prefix = shm_prefix + "x" * (63 - len(shm_prefix)) + "."  # a 64-character prefix
    agent = AgentProcess(
        socket_path=tmp_path / "long.sock",
        shm_prefix=prefix,
        memory_limit="64MiB",
        log_path=tmp_path / "long.log",
        extra_args=["--on-exit", "remove"],
    )
    try:
        agent.start()
        with Checkpointer("j" * 64, rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
            ck.snapshot(1, make_state(1))
            assert ck.wait().committed
    finally:
        assert agent.stop() == 0
