"""Named crash points for fault tests: a no-op unless MEMCKPT_FAULTS names the point.

`MEMCKPT_FAULTS="trainer.copy.mid=exit"` makes `crash_point("trainer.copy.mid")` run
`os._exit(137)` at exactly that line, as a SIGKILL would end the process there.
"""

from __future__ import annotations

import os
import signal

ENV = "MEMCKPT_FAULTS"


def _parse(spec: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        points[name] = action or "exit"
    return points


_POINTS = _parse(os.environ.get(ENV, ""))


def crash_point(name: str) -> None:
    """Ends the process here when the environment asks for it; otherwise does nothing."""
    action = _POINTS.get(name)
    if action == "exit":
        os._exit(137)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
