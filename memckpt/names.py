"""Validation of the names that reach file and segment names: jobs, prefixes."""

from __future__ import annotations

import re
from pathlib import Path

from memckpt.errors import InvalidRequest

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_name(name: str, what: str = "name") -> str:
    """Returns `name` if it is safe in a file or shm name; raises InvalidRequest otherwise."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise InvalidRequest(f"{what} {name!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ - (not '.' or '..')")
    return name


def safe_join(base: Path, name: str) -> Path:
    """`base / name` for a checked name; fails closed if the result leaves `base`."""
    path = (base / check_name(name)).resolve()
    if path.parent != base.resolve():
        raise InvalidRequest(f"name {name!r} escapes {base}")
    return path
