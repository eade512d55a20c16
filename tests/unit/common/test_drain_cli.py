"""`memckpt drain`'s waiting and progress display, over a fake status source and clock."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace

from memckpt.coordinator.drain import DrainProgress
from memckpt.drain_cli import ProgressLine, describe, fraction_done, watch_drain
from memckpt.errors import MemckptError, Unavailable

START = DrainProgress(
    node="node3",
    alive=True,
    draining=True,
    drained=False,
    fragment_sets_held=4,
    ranks_owned=2,
    ranks_protected=1,
    reason="waiting",
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def source(*statuses: DrainProgress | MemckptError) -> Iterator[DrainProgress | MemckptError]:
    yield from statuses
    while True:
        yield statuses[-1]


def fetcher(statuses: Iterator[DrainProgress | MemckptError]):  # noqa: ANN201
    def fetch() -> DrainProgress:
        found = next(statuses)
        if isinstance(found, MemckptError):
            raise found
        return found

    return fetch


def test_describe_says_what_the_node_still_holds() -> None:
    assert describe(START) == "node3: 4 fragment sets still held for others, 1 of its 2 ranks protected elsewhere"
    done = replace(START, fragment_sets_held=0, ranks_owned=1, ranks_protected=1)
    assert describe(done) == "node3: no fragments held for others, 1 of its 1 rank protected elsewhere"
    assert (
        describe(replace(START, fragment_sets_held=1, ranks_owned=0))
        == "node3: 1 fragment set still held for others, no own ranks"
    )


def test_progress_counts_sets_dropped_of_the_most_seen_and_ranks_protected() -> None:
    assert fraction_done(START, most_sets=4) == 1 / 6
    assert fraction_done(replace(START, fragment_sets_held=1, ranks_protected=2), most_sets=4) == 5 / 6
    assert fraction_done(replace(START, drained=True), most_sets=4) == 1.0


def test_watch_ends_drained_and_shows_every_status_it_fetched() -> None:
    clock, shown = FakeClock(), []

    def show(status: DrainProgress, most_sets: int, elapsed_s: float) -> None:
        shown.append((status.fragment_sets_held, most_sets))

    statuses = source(
        START, replace(START, fragment_sets_held=1), replace(START, fragment_sets_held=0, drained=True, reason="node3 is drained")
    )
    outcome = watch_drain(
        fetcher(statuses),
        timeout_s=60,
        clock=clock,
        sleep=clock.sleep,
        show=show,
    )
    assert (outcome.code, outcome.result, outcome.message) == (0, "drained", "node3 is drained")
    assert shown == [(4, 4), (1, 4), (0, 4)]


def test_watch_times_out_with_the_reason_and_rides_out_an_unreachable_coordinator() -> None:
    clock = FakeClock()
    statuses = source(Unavailable("coordinator at h:1: UNAVAILABLE"), START)
    outcome = watch_drain(fetcher(statuses), timeout_s=5, clock=clock, sleep=clock.sleep, show=lambda s, most, t: None)
    assert (outcome.code, outcome.result) == (1, "timed_out") and clock.now == 105.0
    assert outcome.message == "node3 is not drained after 5 s: waiting"
    unreachable = watch_drain(
        fetcher(source(Unavailable("down"))), timeout_s=2, clock=clock, sleep=clock.sleep, show=lambda s, most, t: None
    )
    assert (unreachable.code, unreachable.result) == (1, "unreachable") and "down" in unreachable.message


def test_watch_stops_when_the_drain_ends_without_finishing() -> None:
    clock = FakeClock()
    for status, result in ((replace(START, alive=False), "failed"), (replace(START, draining=False), "stopped")):
        outcome = watch_drain(fetcher(source(status)), timeout_s=60, clock=clock, sleep=clock.sleep, show=lambda s, m, t: None)
        assert (outcome.code, outcome.result) == (1, result)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_in_place_at_a_terminal_and_plain_lines_otherwise() -> None:
    clock = FakeClock()
    tty = Terminal()
    line = ProgressLine(tty, clock)
    line.show(START, 4, 1.0)
    line.show(replace(START, fragment_sets_held=0, ranks_protected=2), 4, 2.0)
    line.end()
    written = tty.getvalue()
    assert written.count("\r") == 2 and written.endswith("\n") and written.count("\n") == 1
    assert "[####" in written and "[" + "#" * 24 + "]" in written
    plain = io.StringIO()
    line = ProgressLine(plain, clock)
    for _ in range(3):
        line.show(START, 4, 1.0)  # unchanged: printed once...
    clock.now += 5
    line.show(START, 4, 6.0)  # ...and again after a while
    line.show(replace(START, fragment_sets_held=3), 4, 6.5)  # and at every change
    line.end()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == f"{describe(START)} (1 s)" and "\r" not in plain.getvalue()
