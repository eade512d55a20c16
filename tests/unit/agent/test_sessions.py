from __future__ import annotations

from memckpt.agent.sessions import Sessions
from memckpt.agent.slots import Attempt, RankKey

KEY = RankKey(job="j", rank=1)
FIRST = Attempt(run_id="r", generation=1)


def test_a_stream_that_ends_without_detach_is_a_death_and_with_detach_is_not() -> None:
    sessions = Sessions(limit=4)
    died = sessions.open(KEY, FIRST)
    clean = sessions.open(KEY, Attempt(run_id="r", generation=2))
    assert died is not None and clean is not None
    assert sessions.detach(KEY, Attempt(run_id="r", generation=2)) == 1, "only the session of that attempt"
    assert sessions.close(clean) is False
    assert sessions.close(died) is True
    assert sessions.count() == 0


def test_streams_cut_by_the_agent_stopping_are_not_deaths() -> None:
    sessions = Sessions(limit=4)
    session = sessions.open(KEY, FIRST)
    assert session is not None
    sessions.stopping = True
    assert sessions.close(session) is False


def test_at_most_limit_sessions_are_open() -> None:
    sessions = Sessions(limit=1)
    first = sessions.open(KEY, FIRST)
    assert first is not None and sessions.open(RankKey(job="j", rank=2), FIRST) is None
    sessions.close(first)
    assert sessions.open(RankKey(job="j", rank=2), FIRST) is not None


def test_ranks_training_are_those_with_a_session_open_and_not_detached() -> None:
    sessions = Sessions(limit=4)
    first = sessions.open(KEY, FIRST)
    sessions.open(RankKey(job="j", rank=2), FIRST)
    sessions.open(RankKey(job="other", rank=0), FIRST)
    assert sessions.training("j") == {1, 2}
    sessions.detach(RankKey(job="j", rank=2), FIRST)
    assert sessions.training("j") == {1}, "rank 2 is ending cleanly"
    assert first is not None and sessions.close(first)
    assert sessions.training("j") == set() and sessions.training("none") == set()
