"""Persisted checkpoints on the shared filesystem: where they live, which are complete, which go.

Layout: `ROOT/JOB/step-NNNNNNNNNNNN/`, one directory per persisted step, in the
`torch.distributed.checkpoint` format. A checkpoint is complete when its global `.metadata`
exists: that file is written last, atomically, once every rank's files are whole. A
directory without it is incomplete (being written, or left by a crash) and is never loaded.

Retention keeps the newest `keep` complete checkpoints, and every step that is a multiple of
`keep_every` forever; a checkpoint is deleted only when a newer one is complete. Incomplete
directories older than the newest complete checkpoint can never be needed: they go too.
Newer incomplete ones may be in progress on another agent and are left alone.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memckpt.names import check_name

METADATA = ".metadata"  # DCP's global metadata: its presence makes a checkpoint complete
_STEP_DIR = re.compile(r"^step-(\d{12})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool


def step_dir(root: Path, job: str, step: int) -> Path:
    check_name(job, "job")
    if not 0 <= step < 10**12:
        raise ValueError(f"step {step} does not fit a checkpoint directory name")
    return root / job / f"step-{step:012d}"


def list_checkpoints(root: Path, job: str) -> list[Checkpoint]:
    """The job's checkpoint directories, oldest first (complete or not); [] when none."""
    check_name(job, "job")
    found = []
    try:
        entries = list((root / job).iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(step=int(match.group(1)), path=path, complete=(path / METADATA).is_file()))
    return sorted(found, key=lambda c: c.step)


def newest_complete(checkpoints: Sequence[Checkpoint]) -> Checkpoint | None:
    return max((c for c in checkpoints if c.complete), key=lambda c: c.step, default=None)


def to_delete(checkpoints: Sequence[Checkpoint], *, keep: int, keep_every: int = 0) -> list[Checkpoint]:
    """What retention removes now. Pure: `checkpoints` as `list_checkpoints` returns them."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    complete = sorted((c for c in checkpoints if c.complete), key=lambda c: c.step, reverse=True)
    if not complete:
        return []
    newest = complete[0].step
    doomed = [c for c in complete[keep:] if not (keep_every > 0 and c.step % keep_every == 0)]
    doomed += [c for c in checkpoints if not c.complete and c.step < newest]
    return sorted(doomed, key=lambda c: c.step)


def remove(checkpoint: Checkpoint) -> None:
    """Deletes a checkpoint directory; its metadata first, so a half-deleted one reads as incomplete."""
    (checkpoint.path / METADATA).unlink(missing_ok=True)
    shutil.rmtree(checkpoint.path, ignore_errors=True)
