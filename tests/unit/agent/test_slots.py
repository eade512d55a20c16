from __future__ import annotations

import pytest

from memckpt.agent.slots import MemoryBudget, RankKey, SlotState, new_rank_slots
from memckpt.errors import BudgetExceeded, InvalidRequest, StaleGeneration

KEY = RankKey(job="j", rank=0)


def committed(slots, step):  # noqa: ANN001, ANN201 - test helper
    slot, _ = slots.begin(step, 100)
    return slots.commit(slot.index, step, 100, b"m")


def test_begin_commit_moves_free_writing_committed() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    slot, grow = slots.begin(1, 100)
    assert (slot.state, slot.step, grow) == (SlotState.WRITING, 1, False)
    done = slots.commit(slot.index, 1, 80, b"meta")
    assert (done.state, done.step, done.data_size_bytes, done.meta) == (SlotState.COMMITTED, 1, 80, b"meta")
    assert slots.latest_committed() == done


def test_commit_never_overwrites_last_committed_slot() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    first = committed(slots, 1)
    for step in range(2, 10):
        slot, _ = slots.begin(step, 100)
        assert slot.index != slots.latest, "the latest committed slot was handed out for writing"
        assert slots.latest_committed().step == step - 1
        slots.commit(slot.index, step, 100, b"")
    assert first.index in (0, 1)


def test_previous_commit_stays_readable_until_rewritten() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    committed(slots, 1)
    committed(slots, 2)
    assert slots.committed_steps() == [2, 1]
    assert slots.committed_at(1).step == 1
    slots.begin(3, 100)  # rewrites the slot that held step 1
    assert slots.committed_steps() == [2]
    assert slots.committed_at(1) is None


def test_writer_that_died_leaves_committed_snapshot_intact() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    committed(slots, 5)
    slots.begin(6, 100)
    slots.abandon_writes()
    assert slots.latest_committed().step == 5
    assert [s.state for s in slots.slots].count(SlotState.WRITING) == 0


def test_steps_must_grow_within_a_session_but_not_across() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    committed(slots, 5)
    with pytest.raises(StaleGeneration):
        slots.begin(5, 100)
    slots.abandon_writes()  # a new registration
    slot, _ = slots.begin(3, 100)
    assert slot.step == 3


def test_commit_rejects_wrong_step_index_and_size() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    slot, _ = slots.begin(1, 100)
    with pytest.raises(StaleGeneration):
        slots.commit(slot.index, 2, 10, b"")
    with pytest.raises(InvalidRequest):
        slots.commit(7, 1, 10, b"")
    with pytest.raises(InvalidRequest):
        slots.commit(slot.index, 1, 101, b"")
    with pytest.raises(StaleGeneration):
        slots.commit(1 - slot.index, 1, 10, b"")


def test_begin_grows_a_slot_that_is_too_small() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    slot, grow = slots.begin(1, 250)
    assert grow and slot.size_bytes == 250 and slot.version == 1


def test_checksum_of_a_superseded_commit_is_dropped() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    first = committed(slots, 1)
    committed(slots, 2)
    slots.begin(3, 100)  # rewrites first's slot
    assert not slots.set_checksums(first.index, first.commit_id, (1, 2))
    second = slots.latest_committed()
    assert slots.set_checksums(second.index, second.commit_id, (3, 4))
    assert slots.latest_committed().checksums == (3, 4)


def test_budget_refuses_over_limit_and_names_sizes() -> None:
    budget = MemoryBudget(limit_bytes=1 << 30)
    budget.reserve("a", 768 << 20, "a")
    with pytest.raises(BudgetExceeded, match=r"asks 512.0 MiB more; 256.0 MiB free of 1.0 GiB budget"):
        budget.reserve("b", 512 << 20, "b")
    budget.reserve("a", 1 << 30, "a grows")  # an owner's own holding does not count against it
    budget.release("a")
    assert budget.used_bytes == 0


def test_a_pinned_slot_is_never_handed_out_and_protection_sticks_to_its_commit() -> None:
    from memckpt.errors import Unavailable

    slots = new_rank_slots(KEY, 1, 100)
    first = committed(slots, 1)
    second = committed(slots, 2)
    slots.pin(first.index)  # being sent to peers (no target: this rank's newest, its own choice)
    slots.pin(first.index)  # and persisted
    with pytest.raises(Unavailable, match=r"slot 0 \(step 1: being read\), slot 1 \(step 2\); no slot to write: snapshot 3"):
        slots.begin(3, 100)  # written over the latest, this rank would share no step with ranks that wrote their older
    assert slots.session_step == 2 and slots.latest == second.index, "a refused begin changes nothing"
    slots.unpin(first.index)
    with pytest.raises(Unavailable, match="skipped"):
        slots.begin(3, 100)  # still read by the other
    slots.unpin(first.index)
    assert slots.set_protected(second.index, second.commit_id)
    assert slots.latest_committed().protected
    slot, _ = slots.begin(3, 100)
    assert slot.index == first.index and not slot.protected and not slots.set_protected(first.index, first.commit_id)


def test_a_kept_older_slot_has_snapshots_written_over_the_latest_never_skipped() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    target = committed(slots, 10)
    slots.reserved.add(target.index)  # the coordinator's protection target: kept until protected
    for step in range(11, 16):
        writing, _ = slots.begin(step, 100)
        assert writing.index != target.index, "the reserved target was handed out for writing"
        assert slots.latest_committed() == target, "while the latest is written over, the kept one is the newest whole"
        assert slots.committed_steps() == [10]
        slots.commit(writing.index, step, 100, b"")
        assert slots.committed_steps() == [step, 10]
    slots.begin(16, 100)
    assert slots.abandon_writes() == [1 - target.index]  # the writer died mid-copy
    assert slots.latest_committed().step == 10 and slots.committed_steps() == [10]
    slots.release_reservations(None)
    writing, _ = slots.begin(17, 100)
    assert writing.index == 1 - target.index, "the free slot, not the latest"
    slots.commit(writing.index, 17, 100, b"")
    slots.persist_work()
    slots.to_persist.add(writing.index)  # the latest kept until persisted, the older not kept: written as usual
    assert slots.begin(18, 100)[0].index == target.index


def test_attempts_fence_zombies_within_a_run_and_a_new_run_supersedes() -> None:
    from memckpt.agent.slots import Attempt, admit_attempt

    run_a1, run_a2, run_b1 = (
        Attempt(run_id="a", generation=1),
        Attempt(run_id="a", generation=2),
        Attempt(run_id="b", generation=1),
    )
    assert admit_attempt(None, run_a1, registering=False, job="j") == run_a1
    assert admit_attempt(run_a1, run_a2, registering=True, job="j") == run_a2  # torchrun restarted the workers
    with pytest.raises(StaleGeneration, match="generation 1 is older"):
        admit_attempt(run_a2, run_a1, registering=False, job="j")  # a zombie of the first attempt
    assert admit_attempt(run_a2, run_b1, registering=True, job="j") == run_b1  # the job was requeued: a new run
    with pytest.raises(StaleGeneration, match="now runs as 'b'"):
        admit_attempt(run_b1, run_a2, registering=False, job="j")  # the old run's leftovers
    assert admit_attempt(run_a2, run_a2, registering=False, job="j") == run_a2


def test_abandoned_writes_get_new_memory_so_a_late_writer_cannot_tear_the_next_snapshot() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    committed(slots, 1)
    writing, _ = slots.begin(2, 100)  # a writer of an earlier attempt, still copying
    assert slots.abandon_writes() == [writing.index]
    fresh = slots.slots[writing.index]
    assert fresh.state is SlotState.FREE and fresh.version == writing.version + 1
    assert slots.latest_committed().step == 1


def test_check_begin_refuses_like_begin_without_changing_anything() -> None:
    from memckpt.errors import Unavailable

    slots = new_rank_slots(KEY, 1, 100)
    first = committed(slots, 1)
    committed(slots, 2)
    with pytest.raises(StaleGeneration):
        slots.check_begin(2)
    slots.pin(first.index)
    with pytest.raises(Unavailable):
        slots.check_begin(3)
    slots.reserved.add(first.index)
    assert slots.check_begin(3) == 1 - first.index, "the older is the job's target: the latest would be written over"
    slots.pin(1 - first.index)
    with pytest.raises(Unavailable, match=r"step 1: being read and kept until protected\), slot 1 \(step 2: being read"):
        slots.check_begin(3)
    assert slots.session_step == 2 and slots.committed_steps() == [2, 1] and slots.latest == 1 - first.index


def test_to_protect_follows_the_coordinators_target_and_skips_what_is_not_ready() -> None:
    slots = new_rank_slots(RankKey(job="j", rank=0), 1, 100)
    older, newer = committed(slots, 5), committed(slots, 6)
    assert slots.to_protect(None) is None and slots.to_protect(5) is None, "nothing is checksummed yet"
    slots.set_checksums(older.index, older.commit_id, (1,))
    slots.set_checksums(newer.index, newer.commit_id, (2,))
    assert slots.to_protect(None).step == 6, "without a target: the newest commit"
    assert slots.to_protect(5).step == 5, "the target, although a newer step is committed"
    assert slots.to_protect(4) is None, "a target this rank no longer holds"
    assert slots.to_protect(-1) is None, "the coordinator says: nothing now"
    slots.set_protected(older.index, older.commit_id)
    assert slots.to_protect(5) is None, "already protected"


def test_a_commit_protected_on_a_peer_that_may_hold_nothing_now_is_unprotected() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    older, newer = committed(slots, 1), committed(slots, 2)
    assert slots.set_checksums(older.index, older.commit_id, (1,))
    assert slots.set_protected(older.index, older.commit_id, ("b", "c", "d"))
    assert slots.set_protected(newer.index, newer.commit_id, ("b", "e", "d"))
    assert slots.unprotect_unless_held_by(frozenset("bcde")) == [], "every holder may still hold it"
    (was,) = slots.unprotect_unless_held_by(frozenset("bde"))  # c drained, or gone from the group
    assert was.step == 1 and was.protected_by == ("b", "c", "d")
    assert not slots.committed_at(1).protected and slots.committed_at(1).protected_by == ()
    assert slots.committed_at(2).protected
    assert slots.to_protect(1) == slots.committed_at(1), "protected again at the coordinator's word"
    slot, _ = slots.begin(3, 100)
    assert slot.protected_by == (), "a rewritten slot forgets its holders"
    unknown = new_rank_slots(KEY, 1, 100)
    first = committed(unknown, 1)
    unknown.set_protected(first.index, first.commit_id)  # holders not recorded (an older agent's manifest)
    assert unknown.unprotect_unless_held_by(frozenset()) == [] and unknown.latest_committed().protected


def test_a_target_learned_after_its_commit_reserves_one_slot_and_never_both() -> None:
    slots = new_rank_slots(KEY, 1, 100)
    committed(slots, 4)
    slots.abandon_writes()  # the rank registered again (a restarted attempt) ...
    newest = committed(slots, 4)  # ... and committed step 4 again: both slots hold it
    slots.release_reservations(4)
    assert slots.reserved == {newest.index}, "only the newest commit of the target is kept"
    assert slots.writable() is not None, "the other slot still takes snapshots"
    slots.release_reservations(9)
    assert slots.reserved == set(), "a target that moved on frees its slot"
    slots.pin(newest.index)  # being read (a restore)
    slots.release_reservations(3)  # the other slot's step
    assert slots.reserved == set(), "with one slot kept already, the other is never kept too"
