"""Named crash points for fault tests: a no-op unless MEMCKPT_FAULTS names the point.

`MEMCKPT_FAULTS="trainer.copy.after_first=exit"` makes `crash_point("trainer.copy.after_first")`
run `os._exit(137)` at exactly that line, as a SIGKILL would end the process there;
`=exit@3` waits for the third time the point is reached; `=kill` sends a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "MEMCKPT_FAULTS"


def _parse(spec: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        points[name] = action or "exit"
    return points


_POINTS = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Ends the process here when the environment asks for it; otherwise does nothing."""
    spec = _POINTS.get(name)
    if spec is None:
        return
    action, _, nth = spec.partition("@")
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] < int(nth or 1):
            return
    if action == "exit":
        os._exit(137)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
