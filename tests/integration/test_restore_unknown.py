"""A restore never takes "cannot tell" for "nothing held".

An agent with a coordinator that holds nothing for a rank must ask the coordinator whether
peers do. While it cannot (the coordinator is down, or still rebuilding its tables after a
restart), the restore waits, then fails with UNAVAILABLE: a rank on a replacement node that
started fresh while the others restored would silently fork the job. What the agent holds
itself is still served while the coordinator is away.
"""

from __future__ import annotations

import socket
import time

import pytest

from memckpt.errors import Unavailable
from memckpt.trainer import Checkpointer

from .helpers import assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration


def unused_port() -> int:
    """A port nothing listens on (bound and released: a refused connection, like a coordinator that died)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_with_absent_coordinator(agent_factory, wait_s: float):  # noqa: ANN001, ANN201
    return agent_factory(
        extra_args=(
            *("--coordinator", f"127.0.0.1:{unused_port()}"),
            *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"),
            *("--restore-wait-s", str(wait_s)),
        )
    )


def test_nothing_local_and_no_coordinator_is_unavailable_not_a_fresh_start(agent_factory) -> None:  # noqa: ANN001
    agent = agent_with_absent_coordinator(agent_factory, wait_s=1.5)
    with Checkpointer("orphan", rank=0, world_size=1, socket_path=agent.socket_path) as ck:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="not starting fresh"):
            ck.restore(empty_like_state())
        waited = time.monotonic() - started
    assert waited >= 1.5, f"gave up after {waited:.2f} s, before --restore-wait-s"
    assert waited < 20, f"waited {waited:.1f} s for a 1.5 s limit"


def test_local_snapshots_restore_while_the_coordinator_is_away(agent_factory) -> None:  # noqa: ANN001
    agent = agent_with_absent_coordinator(agent_factory, wait_s=30)
    with Checkpointer("alone", rank=0, world_size=1, socket_path=agent.socket_path) as ck:
        for step in (1, 2):
            ck.snapshot(step, make_state(step))
            ck.wait()
    with Checkpointer("alone", rank=0, world_size=1, socket_path=agent.socket_path) as ck:
        started = time.monotonic()
        state = empty_like_state()
        assert ck.restore(state) == 2
        assert time.monotonic() - started < 10, "a local restore waited for the absent coordinator"
    assert_state_equal(state, make_state(2))
