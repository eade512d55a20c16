from __future__ import annotations

from memckpt.trainer.recovery import choose_common_step


def test_fresh_job_starts_fresh() -> None:
    assert choose_common_step([[], []]).step is None


def test_ranks_a_step_apart_agree_on_the_older() -> None:
    choice = choose_common_step([[19, 18], [18, 17]])
    assert choice.step == 18 and "18" in choice.reason


def test_no_common_step_names_the_ranks_that_hold_none() -> None:
    choice = choose_common_step([[5, 4], []])
    assert choice.step is None and "[1]" in choice.reason
