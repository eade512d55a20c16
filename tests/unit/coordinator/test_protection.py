from __future__ import annotations

from memckpt.coordinator.protection import NONE, JobPace, RankProgress, job_protection


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


def test_a_standing_job_never_targets_a_step_older_than_one_a_rank_protected() -> None:
    """Holders keep each rank's newest set and refuse older ones: rank 0 protected 7, so a
    target of 6 (also held by both) could never be protected; 7 can, by rank 1."""
    ranks = {0: progress({6, 7}, {7}), 1: progress({6, 7}, {6})}
    assert job_protection(1, 2, ranks, current_target=NONE, lead=0).target == 7
    behind = {0: progress({6, 7}, {7}), 1: progress({5, 6}, {6})}
    assert job_protection(1, 2, behind, lead=0).target == NONE, "no step both can still protect: wait for the next commit"


def test_a_target_behind_a_rank_s_newest_protected_step_is_replaced() -> None:
    ranks = {0: progress({6, 7}, {7}), 1: progress({6, 7})}
    p = job_protection(1, 2, ranks, current_target=6, lead=1)
    assert p.target == 8, "rank 0 can no longer protect 6: the next target lies ahead"


def test_pace_of_a_job_slower_than_the_refreshes() -> None:
    """Steps of 0.4 s, refreshes every 0.2 s: half the refreshes see no commit, and the job still advances."""
    pace = JobPace()
    assert pace.lead(1, 5, now=0.0, refresh_s=0.2) == 0, "seen first: its steps are there to protect now"
    assert pace.lead(1, 5, now=0.2, refresh_s=0.2) == 0, "not seen to advance yet"
    assert pace.lead(1, 6, now=0.4, refresh_s=0.2) == 2, "0.4 s per step: 4 refreshes take 2 steps"
    assert pace.lead(1, 6, now=0.6, refresh_s=0.2) == 2, "between two commits it still advances"
    assert pace.lead(1, 7, now=0.8, refresh_s=0.2) == 2
    assert pace.lead(1, 7, now=1.8, refresh_s=0.2) == 2, "2.5 of its steps without a commit"
    assert pace.lead(1, 7, now=2.2, refresh_s=0.2) == 0, "3.5 steps without a commit: it stands still"


def test_pace_of_a_fast_job_and_after_a_restart() -> None:
    pace = JobPace()
    for i in range(5):
        pace.lead(1, 10 * i, now=0.2 * i, refresh_s=0.2)  # 50 steps per second
    assert pace.lead(1, 50, now=1.0, refresh_s=0.2) == 40, "4 refreshes' worth of its steps"
    assert pace.lead(1, 50, now=1.3, refresh_s=0.2) == 40, "1.5 refreshes without a commit"
    assert pace.lead(1, 50, now=1.5, refresh_s=0.2) == 0, "2.5 refreshes without a commit: it stands still"
    assert pace.lead(2, 30, now=1.6, refresh_s=0.2) == 0, "a restarted job goes back: its pace is measured again"
    assert pace.lead(2, 31, now=2.0, refresh_s=0.2) == 2
    assert pace.lead(2, 27, now=2.2, refresh_s=0.2) == 2, "only a rank's older step, while its latest is rewritten"
    assert pace.lead(2, 32, now=2.4, refresh_s=0.2) == 2, "its pace measured from 31, as if 27 was never seen"
