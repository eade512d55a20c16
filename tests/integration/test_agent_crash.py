"""The agent dies (kill -9) and comes back: committed snapshots survive; clients carry on."""

from __future__ import annotations

import pytest

from memckpt.errors import Unavailable
from memckpt.local import wait_until
from memckpt.trainer import Checkpointer

from .helpers import assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration


def test_agent_kill9_between_snapshots_keeps_last_committed_step(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    with Checkpointer("crash", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        for step in range(1, 4):
            ck.snapshot(step, make_state(step))
            ck.wait()
    agent.kill()
    agent.start()  # same socket and shm prefix: it re-adopts the manifest
    with Checkpointer("crash", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        restored = empty_like_state()
        assert ck.restore(restored) == 3
    assert_state_equal(restored, make_state(3))


def test_snapshot_while_agent_is_down_warns_and_training_goes_on(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    ck = Checkpointer("flaky", rank=0, world_size=1, socket_path=agent.socket_path)
    try:
        ck.snapshot(1, make_state(1))
        assert ck.wait().committed
        agent.kill()
        handle = ck.snapshot(2, make_state(2))  # must not raise
        assert isinstance(handle.error, Unavailable) and ck.stats.failures["Unavailable"] == 1
        agent.start()
        steps = iter(range(3, 1000))

        def next_snapshot_commits() -> bool:  # training goes on, one snapshot per step
            ck.snapshot(step := next(steps), make_state(step))
            return ck.wait().committed

        wait_until(next_snapshot_commits, 20, "a snapshot to commit after the agent came back", interval_s=0.1)
        restored = empty_like_state()
        step = ck.restore(restored)
        assert step is not None and step >= 3
        assert_state_equal(restored, make_state(step))
    finally:
        ck.close()


def test_strict_checkpointer_raises_when_agent_is_down(agent_factory) -> None:  # noqa: ANN001
    agent = agent_factory()
    with Checkpointer("strict", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
        agent.kill()
        with pytest.raises(Unavailable):
            ck.snapshot(1, make_state(1))
        agent.start()


def test_fresh_agent_without_old_shm_gets_new_snapshots_not_dead_mappings(agent_factory, shm_prefix) -> None:  # noqa: ANN001
    from memckpt.agent.shm import DEFAULT_ROOT

    agent = agent_factory()
    with Checkpointer("fresh", rank=0, world_size=1, socket_path=agent.socket_path) as ck:
        for step in (1, 2):
            ck.snapshot(step, make_state(step))
            assert ck.wait().committed
        agent.kill()
        for path in DEFAULT_ROOT.glob(f"{shm_prefix}*"):
            path.unlink()  # what a rebooted node loses
        agent.start()

        def snapshot_commits(step: int) -> bool:
            ck.snapshot(step, make_state(step))
            return ck.wait().committed

        steps = iter(range(3, 1000))
        wait_until(lambda: snapshot_commits(next(steps)), 20, "a snapshot to commit on the fresh agent", interval_s=0.1)
    with Checkpointer("fresh", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as reader:
        restored = empty_like_state()  # a new process's view: what the agent really holds
        step = reader.restore(restored)
    assert step is not None and step >= 3
    assert_state_equal(restored, make_state(step))


def test_a_zombie_of_an_older_attempt_cannot_commit(agent_factory) -> None:  # noqa: ANN001
    from memckpt.errors import StaleGeneration

    agent = agent_factory()
    zombie = Checkpointer("fence", rank=1, world_size=2, socket_path=agent.socket_path, generation=1, run_id="r")
    try:
        zombie.snapshot(5, make_state(5))
        assert zombie.wait().committed
        with Checkpointer(
            "fence", rank=0, world_size=2, socket_path=agent.socket_path, generation=2, run_id="r", strict=True
        ) as new:
            new.snapshot(5, make_state(5))  # the restarted job registers: generation 2 from now on
            assert new.wait().committed
        handle = zombie.snapshot(6, make_state(6))  # FAILED_PRECONDITION, counted, never committed
        assert isinstance(handle.error, StaleGeneration) and "generation 1" in str(handle.error)
        restored = empty_like_state()
        with Checkpointer("fence", rank=1, world_size=2, socket_path=agent.socket_path, generation=2, run_id="r") as reader:
            assert reader.restore(restored, coordinate=False) == 5
        requeued = Checkpointer("fence", rank=1, world_size=2, socket_path=agent.socket_path, generation=1, run_id="s")
        with requeued:  # the job requeued: a new run, its restart count back at 0, is not refused
            requeued.snapshot(6, make_state(6))
            assert requeued.wait().committed
    finally:
        zombie.close()
