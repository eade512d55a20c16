"""The slot store's side of protection: a commit of the coordinator's target is kept until it is
protected, and no longer; snapshots go on over the latest meanwhile. Over a ShmDir in a temporary
directory; the coordinator's target is a plain function."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memckpt.agent.shm import ShmDir
from memckpt.agent.slots import MemoryBudget
from memckpt.agent.store import SlotStore
from memckpt.local import wait_until

SIZE = 1 << 16


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlotStore]:
    store = SlotStore(shm=ShmDir(tmp_path), prefix="t.", budget=MemoryBudget(limit_bytes=16 * SIZE))
    store.start()
    yield store
    store.stop(remove=True)


def snapshot(store: SlotStore, step: int) -> int:
    grant = store.begin("j", 0, step, SIZE)
    store.commit("j", 0, step, grant.index, SIZE, b"{}")
    return grant.index


def test_the_target_is_kept_until_protected_and_snapshots_go_on_over_the_latest(store: SlotStore) -> None:
    target = {"step": 1}
    store.protection_target = lambda job, generation: target["step"]
    store.register("j", 0, 1, SIZE)
    kept = snapshot(store, 1)
    assert snapshot(store, 2) != kept
    for step in (3, 4, 5):
        assert snapshot(store, step) != kept, f"snapshot {step} wrote over the target before it was protected"
        assert [s for s, _ in store.list_steps("j", 0)] == [step, 1]
    wait_until(lambda: bool(store.protection_work(lambda job, generation: target["step"])), 10, "step 1 checksummed")
    (work,) = store.protection_work(lambda job, generation: target["step"])
    assert work.step == 1
    assert store.mark_protected(work, ("b", "c", "d"))
    target["step"] = 9  # the next target, not committed yet
    assert snapshot(store, 6) == kept, "protected: the older slot is written as usual, no protection_work needed"
    assert [s for s, _ in store.list_steps("j", 0)] == [6, 5]


def test_a_target_given_up_is_not_kept_while_the_replicator_rests(store: SlotStore) -> None:
    target = {"step": 2}
    store.protection_target = lambda job, generation: target["step"]
    store.register("j", 0, 1, SIZE)
    snapshot(store, 1)
    kept = snapshot(store, 2)
    latest = snapshot(store, 3)
    target["step"] = 8  # the coordinator gave step 2 up; the replicator has not looked since
    assert snapshot(store, 4) == kept, "the slot of a former target is written, not the latest"
    assert [s for s, _ in store.list_steps("j", 0)] == [4, 3] and latest != kept


def test_a_target_chosen_after_its_commit_is_kept_from_the_next_snapshot_on(store: SlotStore) -> None:
    target: dict[str, int | None] = {"step": None}
    store.protection_target = lambda job, generation: target["step"]
    store.register("j", 0, 1, SIZE)
    snapshot(store, 1)
    kept = snapshot(store, 2)
    target["step"] = 2  # a restarted job's first target: a step it has committed already
    for step in (3, 4, 5):
        assert snapshot(store, step) != kept, f"snapshot {step} wrote over the target before it was protected"
    assert [s for s, _ in store.list_steps("j", 0)] == [5, 2]
    wait_until(lambda: bool(store.protection_work(lambda job, generation: 2)), 10, "step 2 checksummed")
    (work,) = store.protection_work(lambda job, generation: 2)
    assert work.step == 2 and store.mark_protected(work, ("b", "c", "d"))
    assert snapshot(store, 6) == kept, "protected: its slot is written again"


def test_an_agent_killed_while_the_latest_is_written_over_adopts_the_kept_step(tmp_path: Path, store: SlotStore) -> None:
    store.protection_target = lambda job, generation: 1
    store.register("j", 0, 1, SIZE)
    kept = snapshot(store, 1)
    latest = snapshot(store, 2)
    grant = store.begin("j", 0, 3, SIZE)  # the trainer copies step 3 over step 2 ...
    assert grant.index == latest != kept
    # ... when the agent is SIGKILLed: a new one adopts what the manifest says
    again = SlotStore(shm=ShmDir(tmp_path), prefix="t.", budget=MemoryBudget(limit_bytes=16 * SIZE))
    try:
        assert again.adopt() == 1
        assert [s for s, _ in again.list_steps("j", 0)] == [1], "the slot being written is not adopted as step 2"
        assert again.open_restore("j", 0).step == 1
    finally:
        again.stop(remove=False)  # the fixture's store removes the segments
