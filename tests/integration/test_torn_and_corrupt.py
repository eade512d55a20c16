"""A torn write is never restored; a flipped byte is caught by its checksum and never loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.errors import CorruptSnapshot
from memckpt.local import wait_until
from memckpt.protos import agent_pb2 as pb
from memckpt.trainer import Checkpointer

from .helpers import agent_stub, assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration

WRITER = textwrap.dedent("""
    import sys
    from memckpt.trainer import Checkpointer
    from tests.integration.helpers import make_state
    ck = Checkpointer("torn", rank=0, world_size=1, socket_path=sys.argv[1], strict=True)
    ck.snapshot(1, make_state(1, 1 << 22))
    ck.wait()
    ck.snapshot(2, make_state(2, 1 << 22))  # the crash point ends the process inside this copy
    ck.wait()
    print("not reached")
""")


def test_trainer_killed_mid_write_restores_previous_step(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    env = {"MEMCKPT_FAULTS": "trainer.copy.after_first=exit@2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(agent.socket_path)], env=env, capture_output=True, text=True, cwd=".", timeout=120
    )
    assert done.returncode == 137, done.stderr
    with Checkpointer("torn", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        restored = empty_like_state(1 << 22)
        assert ck.restore(restored) == 1
    assert_state_equal(restored, make_state(1, 1 << 22))


def committed_slot_name(stub, job: str) -> str:  # noqa: ANN001
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    rank = next(r for r in status.ranks if r.job == job)
    slot = next(s for s in rank.slots if s.state == pb.SLOT_STATE_COMMITTED and s.step == rank.committed_step)
    return slot.name if slot.checksum_ready else ""


def test_flipped_byte_in_committed_slot_is_data_loss(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    channel, stub = agent_stub(agent.socket_path)
    with channel, Checkpointer("flip", rank=2, world_size=4, socket_path=agent.socket_path, strict=True) as ck:
        ck.snapshot(9, make_state(9))
        ck.wait()
        wait_until(lambda: bool(committed_slot_name(stub, "flip")), 30, "the background checksum")
        path = DEFAULT_ROOT / committed_slot_name(stub, "flip")
        with open(path, "r+b") as segment:
            segment.seek(1000)
            byte = segment.read(1)
            segment.seek(1000)
            segment.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenRestore(pb.OpenRestoreRequest(job="flip", rank=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        target = empty_like_state()
        with pytest.raises(CorruptSnapshot, match=r"job 'flip' rank 2 step 9"):
            ck.restore(target)
        assert not target["model"]["w"].any(), "nothing of a corrupt snapshot may be loaded"
