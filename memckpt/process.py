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
