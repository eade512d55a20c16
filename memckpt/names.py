"""Validation of the names that reach file and segment names: jobs, nodes, prefixes."""

from __future__ import annotations

import re
from pathlib import Path

from memckpt.errors import InvalidRequest

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
NAME_MAX = 64  # jobs, nodes, domains, prefixes
FILE_NAME_MAX = 255  # names built from them (prefix + job + suffix), as far as the filesystem allows


def check_name(name: str, what: str = "name", max_len: int = NAME_MAX) -> str:
    """Returns `name` if it is safe in a file or shm name; raises InvalidRequest otherwise."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > max_len or name in (".", ".."):
        raise InvalidRequest(f"{what} {name!r} is invalid: use 1-{max_len} of A-Z a-z 0-9 . _ - (not '.' or '..')")
    return name


def safe_join(base: Path, name: str) -> Path:
    """`base / name` for a checked file name; fails closed if the result leaves `base`."""
    path = (base / check_name(name, "file name", FILE_NAME_MAX)).resolve()
    if path.parent != base.resolve():
        raise InvalidRequest(f"name {name!r} escapes {base}")
    return path
