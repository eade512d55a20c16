from __future__ import annotations

from pathlib import Path

import pytest

from memckpt.agent.checkpoints import (
    ATTEMPT,
    METADATA,
    Checkpoint,
    claim,
    list_checkpoints,
    newest_complete,
    remove,
    step_dir,
    to_delete,
)
from memckpt.errors import InvalidRequest


def ckpt(step: int, complete: bool = True) -> Checkpoint:
    return Checkpoint(step=step, path=Path(f"/x/step-{step:012d}"), complete=complete)


def steps(checkpoints: list[Checkpoint]) -> list[int]:
    return [c.step for c in checkpoints]


def test_step_dir_names_sort_by_step_and_refuse_odd_jobs(tmp_path: Path) -> None:
    assert step_dir(tmp_path, "job-a", 50).name == "step-000000000050"
    with pytest.raises(InvalidRequest):
        step_dir(tmp_path, "../etc", 1)
    with pytest.raises(ValueError):
        step_dir(tmp_path, "job", -1)


def test_listing_tells_complete_from_incomplete_and_ignores_strangers(tmp_path: Path) -> None:
    for step, complete in ((100, True), (50, True), (150, False)):
        path = step_dir(tmp_path, "j", step)
        path.mkdir(parents=True)
        if complete:
            (path / METADATA).write_bytes(b"m")
    (tmp_path / "j" / "step-12").mkdir()  # not ours
    (tmp_path / "j" / "notes.txt").write_text("x")
    found = list_checkpoints(tmp_path, "j")
    assert [(c.step, c.complete) for c in found] == [(50, True), (100, True), (150, False)]
    assert newest_complete(found) == found[1]
    assert list_checkpoints(tmp_path, "other") == []


def test_retention_keeps_the_newest_and_every_nth_and_drops_stale_incomplete() -> None:
    found = [ckpt(10), ckpt(20), ckpt(25, complete=False), ckpt(30), ckpt(40), ckpt(50), ckpt(60, complete=False)]
    assert steps(to_delete(found, keep=2)) == [10, 20, 25, 30]
    assert steps(to_delete(found, keep=2, keep_every=20)) == [10, 25, 30], "20 and 40 are kept forever"


def test_nothing_goes_before_a_checkpoint_is_complete() -> None:
    assert to_delete([ckpt(10, complete=False), ckpt(20, complete=False)], keep=1) == []
    assert to_delete([ckpt(10), ckpt(20, complete=False)], keep=1) == [], "20 may be in progress"
    with pytest.raises(ValueError):
        to_delete([ckpt(10)], keep=0)


def test_remove_drops_the_metadata_first_and_the_directory(tmp_path: Path) -> None:
    path = step_dir(tmp_path, "j", 5)
    path.mkdir(parents=True)
    (path / METADATA).write_bytes(b"m")
    (path / "__0_0.distcp").write_bytes(b"d")
    remove(list_checkpoints(tmp_path, "j")[0])
    assert not path.exists()


def test_claim_keeps_its_own_attempt_and_clears_another_attempts_files(tmp_path: Path) -> None:
    from memckpt.agent.checkpoints import ATTEMPT, claim

    path = step_dir(tmp_path, "j", 8)
    claim(path, "run-a/1")
    (path / "__0_0.distcp").write_bytes(b"rank 0 of run-a")
    claim(path, "run-a/1")
    assert (path / "__0_0.distcp").exists(), "the same attempt's files stay"
    claim(path, "run-b/1")
    assert (path / ATTEMPT).read_text() == "run-b/1"
    assert sorted(p.name for p in path.iterdir()) == [ATTEMPT], "run-a's files never mix with run-b's"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "the stale copy is removed"


def test_claim_treats_files_without_a_marker_as_stale(tmp_path: Path) -> None:
    from memckpt.agent.checkpoints import claim

    path = step_dir(tmp_path, "j", 8)
    path.mkdir(parents=True)
    (path / "__1_0.distcp").write_bytes(b"left by a crash")
    claim(path, "run-a/2")
    assert not (path / "__1_0.distcp").exists()


def test_another_agents_claim_in_progress_is_not_taken_for_a_stale_directory(tmp_path: Path) -> None:
    directory = step_dir(tmp_path, "j", 30)
    directory.mkdir(parents=True)
    in_progress = directory / f"{ATTEMPT}.0badc0de.tmp"  # another agent's marker, about to be linked
    in_progress.write_text("run/1")
    claim(directory, "run/1")
    assert in_progress.exists(), "the directory was not moved away under the other agent"
    assert (directory / ATTEMPT).read_text() == "run/1"
    assert sorted(p.name for p in tmp_path.joinpath("j").iterdir()) == [directory.name]
