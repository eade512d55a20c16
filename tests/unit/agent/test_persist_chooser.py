from __future__ import annotations

from memckpt.agent.persist import PersistPolicy, StepChooser


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_by_steps_every_agent_picks_the_multiples_whatever_it_saw_before() -> None:
    a, b = StepChooser(PersistPolicy(every_steps=4)), StepChooser(PersistPolicy(every_steps=4))
    assert [s for s in range(1, 13) if a.wants("j", 1, s)] == [4, 8, 12]
    assert [s for s in (5, 9, 12, 13) if b.wants("j", 1, s)] == [12], "b skipped 8: 12 still aligns"
    assert not a.wants("j", 1, 0)


def test_by_time_the_first_commit_of_a_step_decides_for_every_rank() -> None:
    clock = Clock()
    chooser = StepChooser(PersistPolicy(interval_s=30.0), clock=clock)
    assert not chooser.wants("j", 1, 1)  # the clock starts with the job's first commit
    clock.now += 31
    assert chooser.wants("j", 1, 7)
    clock.now += 1
    assert chooser.wants("j", 1, 7), "rank 1 commits step 7 a moment later: the same answer"
    assert not chooser.wants("j", 1, 8)
    assert not chooser.wants("other", 1, 8), "each job has its own clock"


def test_off_when_neither_measure_is_set() -> None:
    chooser = StepChooser(PersistPolicy())
    assert not PersistPolicy().enabled
    assert not any(chooser.wants("j", 1, s) for s in range(1, 100))
