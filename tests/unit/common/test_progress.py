from __future__ import annotations

import io

from memckpt.progress import LINE_EVERY_S, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_prints_a_line_at_most_every_few_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("verifying", 4 << 30, out=out, clock=clock)
    progress.update(1 << 30)
    clock.now += 1.0
    progress.update(2 << 30)  # too soon for another line
    clock.now += LINE_EVERY_S
    progress.update(3 << 30)
    progress.end()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert "25%" in lines[0] and "1.0 GiB of 4.0 GiB" in lines[0]
    assert "75%" in lines[1] and "6.0 s" in lines[1]


def test_a_terminal_gets_one_bar_rewritten_in_place_then_closed() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress("exporting", 100, out=out, clock=clock)
    for done in (10, 50, 100):
        progress.update(done)
    progress.end()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 30 + "] 100%" in text.rsplit("\r", 1)[1]


def test_an_unknown_total_shows_bytes_and_time() -> None:
    out = io.StringIO()
    Progress("exporting", 0, out=out, clock=Clock()).update(3 << 20)
    assert out.getvalue().strip() == "exporting: 3.0 MiB, 0.0 s"
