"""The start-up every memckpt daemon shares: layered config, logging, signals, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from memckpt import config as config_mod
from memckpt.errors import ConfigError

C = TypeVar("C")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_daemon(
    parser: argparse.ArgumentParser,
    config_class: Callable[..., C],
    argv: list[str] | None,
    serve: Callable[[C, threading.Event], int],
    umask: int | None = None,
) -> int:
    """Parses flags into the config, logs it once, and serves until SIGTERM or SIGINT.

    Returns 2 for a configuration error (said on stderr, or in the log once logging is up).
    """
    args = parser.parse_args(argv)
    try:
        config: Any = config_mod.load_config(config_class, args)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    if umask is not None:
        os.umask(umask)
    log = logging.getLogger(f"memckpt.{parser.prog.removeprefix('memckpt-')}")
    log.info("config %s", config_mod.to_json(config))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        return serve(config, stop)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2


class Shutdown:
    """A daemon's stop, in stages, within one deadline: each stage is given what is left of
    `budget_s` (at least `floor_s`, so a late stage still gets to tidy up), a stage that
    raises is logged and the next one runs, and a slow stage is named in the log. The stop
    then ends in time for the supervisor's grace period (systemd, Kubernetes, the tests'
    harness), so the last stages (unlinking shared memory) run instead of a SIGKILL."""

    def __init__(
        self,
        log: logging.Logger,
        budget_s: float,
        clock: Callable[[], float],
        floor_s: float = 0.1,
        slow_s: float = 1.0,
    ) -> None:
        self._log = log
        self._clock = clock
        self._deadline = clock() + budget_s
        self._floor_s = floor_s
        self._slow_s = slow_s
        self.failed: list[str] = []  # the stages that raised

    def left_s(self) -> float:
        return max(self._floor_s, self._deadline - self._clock())

    def stage(self, name: str, step: Callable[[float], object]) -> None:
        """Runs `step(timeout_s)`; it should return within `timeout_s`."""
        started = self._clock()
        try:
            step(self.left_s())
        except Exception:
            self._log.exception("stopping: %s failed; stopping goes on", name)
            self.failed.append(name)
        took = self._clock() - started
        if took >= self._slow_s:
            self._log.warning("stopping: %s took %.1fs", name, took)
