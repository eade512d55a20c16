from __future__ import annotations

from memckpt.coordinator.persistence import NONE, JobPersistence, PersistPolicy, RankPersistence, job_persistence

EVERY_10 = PersistPolicy(every_steps=10)


def rank(committed: set[int], written: set[int] | None = None) -> RankPersistence:
    return RankPersistence(committed=frozenset(committed), written=frozenset(written or ()))


def look(policy: PersistPolicy, previous: JobPersistence, ranks: dict[int, RankPersistence], *, target: int,
         complete: int = NONE, now: float = 100.0, world: int = 2) -> JobPersistence:  # fmt: skip
    return job_persistence(policy, previous, world, ranks, target=target, complete=complete, now=now)


def test_off_by_default_nothing_is_chosen() -> None:
    p = look(PersistPolicy(), JobPersistence(generation=1), {0: rank({50}), 1: rank({50})}, target=52)
    assert (p.persist, p.finalize) == (NONE, NONE)


def test_the_first_persist_is_the_target_once_every_steps_are_reached() -> None:
    start = JobPersistence(generation=1)
    assert look(EVERY_10, start, {0: rank({7}), 1: rank({7})}, target=9).persist == NONE
    p = look(EVERY_10, start, {0: rank({8}), 1: rank({8})}, target=11)
    assert (p.persist, p.chosen_step) == (11, 11)


def test_the_chosen_step_stays_until_every_rank_wrote_it_then_finalize_says_so() -> None:
    chosen = JobPersistence(generation=1, persist=11, chosen_step=11, chosen_at=100.0)
    p = look(EVERY_10, chosen, {0: rank({12, 13}, {11}), 1: rank({11, 12})}, target=14)
    assert (p.persist, p.finalize) == (11, NONE), "rank 1 holds 11 and is still writing it"
    p = look(EVERY_10, chosen, {0: rank({12, 13}, {11}), 1: rank({12, 13}, {11})}, target=14)
    assert (p.persist, p.finalize) == (11, 11)


def test_a_missing_rank_is_not_written() -> None:
    chosen = JobPersistence(generation=1, persist=11, chosen_step=11)
    p = look(EVERY_10, chosen, {0: rank({12}, {11})}, target=14, world=2)
    assert p.finalize == NONE


def test_once_complete_the_next_one_comes_every_steps_later() -> None:
    chosen = JobPersistence(generation=1, persist=11, chosen_step=11, chosen_at=100.0)
    p = look(EVERY_10, chosen, {0: rank({15}, {11}), 1: rank({15}, {11})}, target=17, complete=11)
    assert (p.persist, p.finalize, p.complete) == (NONE, NONE, 11)
    assert look(EVERY_10, p, {0: rank({19}), 1: rank({19})}, target=20).persist == NONE
    assert look(EVERY_10, p, {0: rank({20}), 1: rank({20})}, target=21).persist == 21


def test_a_step_recycled_unwritten_is_given_up_and_the_next_is_chosen_at_once() -> None:
    chosen = JobPersistence(generation=1, persist=11, chosen_step=11, chosen_at=100.0)
    p = look(EVERY_10, chosen, {0: rank({13, 14}), 1: rank({12, 13}, {11})}, target=16)
    assert p.persist == 16, "rank 0 went past 11 without writing it"


def test_interval_chooses_by_time() -> None:
    policy = PersistPolicy(interval_s=30.0)
    last = JobPersistence(generation=1, complete=5, chosen_step=5, chosen_at=100.0)
    ranks = {0: rank({8}), 1: rank({8})}
    assert look(policy, last, ranks, target=9, now=129.0).persist == NONE
    assert look(policy, last, ranks, target=9, now=130.0).persist == 9


def test_a_target_not_newer_than_the_complete_checkpoint_is_not_persisted_again() -> None:
    p = look(EVERY_10, JobPersistence(generation=1, complete=20), {0: rank({20}), 1: rank({20})}, target=20)
    assert p.persist == NONE
