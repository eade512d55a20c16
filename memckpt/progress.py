"""Progress of long CLI work (verify, export): a bar rewritten in place at a terminal, plain
lines otherwise (at most one every LINE_EVERY_S, so logs of batch jobs stay short). Written to
stderr, so that `--json` output on stdout stays clean."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from memckpt.sizes import format_size

LINE_EVERY_S = 5.0
BAR_WIDTH = 30


class Progress:
    def __init__(
        self, what: str, total_bytes: int, out: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._what = what
        self.total_bytes = max(0, total_bytes)
        self._out = out if out is not None else sys.stderr
        self._tty = self._out.isatty()
        self._clock = clock
        self._started = clock()
        self._last_line_at: float | None = None
        self._width = 0

    def line(self, done_bytes: int) -> str:
        elapsed = self._clock() - self._started
        if not self.total_bytes:
            return f"{self._what}: {format_size(done_bytes)}, {elapsed:.1f} s"
        share = min(1.0, done_bytes / self.total_bytes)
        bar = "#" * int(share * BAR_WIDTH)
        return (
            f"{self._what} [{bar.ljust(BAR_WIDTH, '.')}] {share:4.0%} "
            f"{format_size(done_bytes)} of {format_size(self.total_bytes)}, {elapsed:.1f} s"
        )

    def update(self, done_bytes: int) -> None:
        text = self.line(done_bytes)
        if self._tty:
            self._out.write("\r" + text.ljust(self._width))
            self._out.flush()
            self._width = len(text)
            return
        now = self._clock()
        if self._last_line_at is None or now - self._last_line_at >= LINE_EVERY_S:
            print(text, file=self._out, flush=True)
            self._last_line_at = now

    def end(self) -> None:
        """Closes the bar at a terminal (the caller prints the outcome)."""
        if self._width:
            self._out.write("\n")
            self._out.flush()
            self._width = 0
