from __future__ import annotations

from memckpt.trainer.recovery import choose_common_step


def test_fresh_job_starts_fresh() -> None:
    choice = choose_common_step([[], []])
    assert choice.step is None and not choice.lost


def test_ranks_a_step_apart_agree_on_the_older() -> None:
    choice = choose_common_step([[19, 18], [18, 17]])
    assert choice.step == 18 and "18" in choice.reason


def test_no_common_step_names_the_ranks_that_hold_none() -> None:
    choice = choose_common_step([[5, 4], []])
    assert choice.step is None and choice.lost and "[1]" in choice.reason


def test_disjoint_steps_are_lost_not_a_fresh_start() -> None:
    choice = choose_common_step([[14, 13], [11]])
    assert choice.step is None and choice.lost and "cannot restore" in choice.reason
