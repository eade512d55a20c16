"""A daemon's stop in stages within one deadline (memckpt.process.Shutdown)."""

from __future__ import annotations

import logging

import pytest

from memckpt.process import Shutdown


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_stage_gets_what_is_left_and_a_late_one_still_gets_the_floor() -> None:
    clock, given = Clock(), []

    def stage(took_s: float):  # type: ignore[no-untyped-def]
        def run(timeout_s: float) -> None:
            given.append(timeout_s)
            clock.now += took_s

        return run

    shutdown = Shutdown(logging.getLogger("test"), budget_s=8.0, clock=clock, floor_s=0.5)
    shutdown.stage("servers", stage(5.0))
    shutdown.stage("persister", stage(4.0))  # runs past the deadline
    shutdown.stage("fragments", stage(0.0))
    assert given == [8.0, 3.0, 0.5]
    assert shutdown.failed == []


def test_a_stage_that_raises_is_logged_and_the_next_ones_run(caplog: pytest.LogCaptureFixture) -> None:
    ran = []

    def broken(_: float) -> None:
        raise RuntimeError("the link's channel is gone")

    shutdown = Shutdown(logging.getLogger("test"), budget_s=8.0, clock=Clock())
    with caplog.at_level(logging.INFO):
        shutdown.stage("coordinator link", broken)
        shutdown.stage("fragments", ran.append)
    assert shutdown.failed == ["coordinator link"]
    assert ran == [8.0]
    assert "stopping: coordinator link failed; stopping goes on" in caplog.text
    assert "the link's channel is gone" in caplog.text


def test_a_slow_stage_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()

    def slow(_: float) -> None:
        clock.now += 4.2

    shutdown = Shutdown(logging.getLogger("test"), budget_s=8.0, clock=clock, slow_s=1.0)
    with caplog.at_level(logging.INFO):
        shutdown.stage("serving", slow)
        shutdown.stage("slots", lambda _: None)
    assert "stopping: serving took 4.2s" in caplog.text
    assert "slots took" not in caplog.text
