"""`memckpt status` and `release` against a real agent; a state that grows gets a new layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from memckpt.trainer import Checkpointer

from .helpers import make_state

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memckpt.cli", *args], capture_output=True, text=True, timeout=60)


def test_status_shows_ranks_and_release_frees_them(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory(memory_limit="512MiB")
    with Checkpointer("st", rank=1, world_size=2, socket_path=agent.socket_path, strict=True) as ck:
        ck.snapshot(4, make_state(4))
        ck.wait()
        training = cli("release", "st", "--socket", str(agent.socket_path))
        assert training.returncode == 1 and "rank(s) [1] still train on this node" in training.stderr, training.stderr
    status = json.loads(cli("status", "--json", "--socket", str(agent.socket_path)).stdout)
    (rank,) = status["ranks"]
    assert (rank["job"], rank["rank"], rank["world_size"], rank["committed_step"]) == ("st", 1, 2, 4)
    assert status["memory_limit_bytes"] == 512 << 20 and status["memory_used_bytes"] > 0
    table = cli("status", "--socket", str(agent.socket_path)).stdout
    assert "st" in table and "committed@4" in table
    released = cli("release", "st", "--socket", str(agent.socket_path))
    assert released.returncode == 0 and "1 rank(s)" in released.stdout and "other nodes were not asked" in released.stdout
    after = json.loads(cli("status", "--json", "--socket", str(agent.socket_path)).stdout)
    assert after["ranks"] == [] and after["memory_used_bytes"] == 0
    missing = cli("release", "st", "--socket", str(agent.socket_path))
    assert missing.returncode == 1 and "no slots" in missing.stderr


def test_status_of_an_absent_agent_says_so(tmp_path) -> None:  # noqa: ANN001
    done = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_state_that_grows_gets_a_new_layout_and_bigger_slot(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    with Checkpointer("grow", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        ck.snapshot(1, {"w": torch.ones(1000)})
        ck.wait()
        big = {"w": torch.arange(100_000, dtype=torch.float32), "extra": torch.ones(7)}
        ck.snapshot(2, big)
        ck.wait()
        target = {"w": torch.zeros(100_000), "extra": torch.zeros(7)}
        assert ck.restore(target) == 2
        assert torch.equal(target["w"], big["w"]) and torch.equal(target["extra"], big["extra"])
        ck.snapshot(3, {"w": torch.full((10,), 3.0)})  # shrinking reuses the big slot
        ck.wait()
        small = {"w": torch.zeros(10)}
        assert ck.restore(small) == 3 and torch.equal(small["w"], torch.full((10,), 3.0))


def test_clean_stop_keeps_slots_for_the_next_agent(tmp_path, shm_prefix) -> None:  # noqa: ANN001
    from memckpt.local import AgentProcess

    agent = AgentProcess(
        socket_path=tmp_path / "k.sock", shm_prefix=shm_prefix, memory_limit="256MiB", log_path=tmp_path / "k.log"
    )
    try:
        agent.start()
        with Checkpointer("keep", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
            ck.snapshot(8, make_state(8))
            ck.wait()
        assert agent.stop() == 0  # SIGTERM with --on-exit keep (the default): an upgrade, say
        agent.start()
        with Checkpointer("keep", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
            target = make_state(0)
            assert ck.restore(target) == 8 and torch.equal(target["model"]["w"], make_state(8)["model"]["w"])
        assert cli("release", "keep", "--socket", str(agent.socket_path)).returncode == 0
    finally:
        agent.stop()
