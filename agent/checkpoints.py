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

import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memckpt.names import check_name

METADATA = ".metadata"  # DCP's global metadata: its presence makes a checkpoint complete
ATTEMPT = ".attempt"  # the job attempt whose ranks write into an incomplete checkpoint
_STEP_DIR = re.compile(r"^step-(\d{12})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool


def step_dir(root: Path, job: str, step: int) -> Path:
    check_name(job, "job")
    return step_dir_in(root / job, step)


def step_dir_in(job_dir: Path, step: int) -> Path:
    """The directory of `step` in a job's directory (ROOT/JOB)."""
    if not 0 <= step < 10**12:
        raise ValueError(f"step {step} does not fit a checkpoint directory name")
    return job_dir / f"step-{step:012d}"


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


def complete_steps(root: Path, job: str) -> list[int]:
    """Steps of the job's complete checkpoints, newest first."""
    return sorted((c.step for c in list_checkpoints(root, job) if c.complete), reverse=True)


def claim(directory: Path, attempt: str) -> None:
    """Makes `directory` (an incomplete checkpoint) the one of `attempt` before a rank writes into it.

    A job that restarted writes some step numbers again, and another attempt's files there
    (left by a crash, or a job that went back) must never be finalized with this one's. An
    `.attempt` marker names the directory's attempt; a directory of another attempt, or
    with files and no marker, is renamed away (atomically: of several agents claiming it at
    once, one moves it) and removed, then made again with this attempt's marker.
    """
    marker = directory / ATTEMPT
    for _ in range(5):
        try:
            if marker.read_text() == attempt:
                return
            stale = True
        except FileNotFoundError:
            # files other than claims in progress (another agent's marker about to be linked)
            stale = directory.is_dir() and any(not _is_claim(p.name) for p in directory.iterdir())
        if stale:
            doomed = directory.with_name(f"{directory.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(directory, doomed)
            except FileNotFoundError:
                pass  # another agent moved it first
            else:
                shutil.rmtree(doomed, ignore_errors=True)
        written = directory / f"{ATTEMPT}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            written.write_text(attempt)
            os.link(written, marker)  # appears whole, and only if no other agent's came first
            return
        except FileExistsError:
            continue  # another agent claimed it meanwhile: read whose it is
        except FileNotFoundError:
            continue  # another agent moved the directory away meanwhile: look again
        finally:
            written.unlink(missing_ok=True)
    raise OSError(f"cannot claim checkpoint directory {directory} for attempt {attempt}: it keeps changing")


def _is_claim(name: str) -> bool:
    return name.startswith(f"{ATTEMPT}.") and name.endswith(".tmp")


def describe(checkpoint: Checkpoint) -> tuple[int, float]:
    """Bytes of a checkpoint's files, and when it was last written (its metadata's time when complete)."""
    size, mtime = 0, 0.0
    for path in checkpoint.path.iterdir():
        try:
            info = path.stat()
        except FileNotFoundError:  # removed meanwhile
            continue
        size += info.st_size
        mtime = max(mtime, info.st_mtime)
    return size, mtime


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
