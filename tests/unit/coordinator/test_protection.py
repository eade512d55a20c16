from __future__ import annotations

from memckpt.coordinator.protection import NONE, RankProgress, job_protection


def progress(committed: set[int], complete: set[int] | None = None) -> RankProgress:
    return RankProgress(committed=frozenset(committed), complete=frozenset(complete or ()))


def test_first_target_lies_ahead_of_the_newest_commit_by_the_lead() -> None:
    p = job_protection(1, 3, {0: progress({5, 6}), 1: progress({5, 6}), 2: progress({4, 5})}, lead=3)
    assert (p.target, p.keep) == (9, NONE)


def test_a_target_not_reached_yet_stays() -> None:
    p = job_protection(1, 2, {0: progress({8, 9}), 1: progress({7, 8})}, current_target=9, lead=1)
    assert p.target == 9, "rank 1 will commit 9 soon"


def test_target_stays_until_every_rank_protected_it_even_when_newer_steps_commit() -> None:
    ranks = {0: progress({7, 8}, {5}), 1: progress({5, 8}), 2: progress({5, 8})}
    p = job_protection(1, 3, ranks, current_target=5, lead=1)
    assert (p.target, p.keep) == (5, NONE), "rank 0 finished 5 first; the others still hold and send 5"


def test_keep_advances_when_every_rank_protected_the_target_and_a_newer_target_follows() -> None:
    ranks = {0: progress({8, 9}, {3, 5}), 1: progress({8, 9}, {5}), 2: progress({8, 9}, {5})}
    p = job_protection(1, 3, ranks, current_target=5, lead=1)
    assert (p.target, p.keep) == (10, 5)


def test_target_a_rank_can_no_longer_protect_is_replaced_by_a_newer_common_step() -> None:
    ranks = {0: progress({8, 9}, {5}), 1: progress({8, 9}), 2: progress({5, 9})}  # rank 1 recycled 5 unprotected
    p = job_protection(1, 3, ranks, current_target=5, lead=2)
    assert (p.target, p.keep) == (11, NONE)


def test_after_the_target_is_protected_everywhere_the_next_lies_ahead() -> None:
    ranks = {0: progress({6}, {6}), 1: progress({6}, {6})}
    p = job_protection(2, 2, ranks, current_target=6, lead=1)
    assert (p.generation, p.target, p.keep) == (2, 7, 6)


def test_a_job_standing_still_protects_its_newest_common_step() -> None:
    ranks = {0: progress({6, 7}, {3}), 1: progress({6, 7}, {3})}
    p = job_protection(1, 2, ranks, current_target=9, lead=0)
    assert (p.target, p.keep) == (7, 3), "9 will not come: the job stopped at 7"
    done = {0: progress({6, 7}, {7}), 1: progress({6, 7}, {7})}
    assert job_protection(1, 2, done, current_target=7, lead=0).target == NONE


def test_a_rank_without_any_report_holds_back_the_kept_step() -> None:
    p = job_protection(1, 3, {0: progress({4}, {4}), 1: progress({4}, {4})})
    assert p.keep == NONE, "rank 2 has nothing protected: no step is safe for the job"
