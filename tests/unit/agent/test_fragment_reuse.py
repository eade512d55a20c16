"""A holder receives each new step of a rank into the segment of a dropped one, in place: no new
shared memory per put, and still nothing torn, stale or lent is ever served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memckpt.agent.fragments import Chunk, FragmentStore
from memckpt.agent.shm import ShmDir
from memckpt.agent.slots import MemoryBudget
from memckpt.errors import CorruptSnapshot

from .test_fragments import DATA, GROUP, PREFIX, chunks, fragments_of, header, read_back

FRAGMENT_BYTES = len(fragments_of(DATA)[0])


@pytest.fixture
def shm(tmp_path: Path) -> ShmDir:
    return ShmDir(tmp_path)


def step_data(step: int) -> bytes:
    return bytes([step]) * (len(DATA) - 1) + bytes([255 - step])


def put_step(store: FragmentStore, step: int) -> None:
    data = step_data(step)
    store.put(header(data, step=step), chunks(fragments_of(data)[0], 1000))
    store.settle()  # mapped in: the next put into this segment copies through the mapping


def segments(shm: ShmDir) -> dict[str, int]:
    """Fragment segment name -> inode."""
    return {n: os.stat(shm.root / n).st_ino for n in shm.list_names(PREFIX) if not n.endswith(".manifest")}


def test_new_steps_are_received_into_the_dropped_steps_segments(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = FragmentStore(shm=shm, prefix=PREFIX, budget=budget, node="b", group=lambda: GROUP)
    for step in (1, 2, 3):
        put_step(store, step)
    inodes = set(segments(shm).values())
    assert len(inodes) == 3 and budget.used_bytes == 3 * FRAGMENT_BYTES  # steps 2, 3 and step 1's, the spare
    for step in range(4, 9):
        put_step(store, step)
        assert set(segments(shm).values()) == inodes, "no new segment: the spare is renamed and written over"
        assert budget.used_bytes == 3 * FRAGMENT_BYTES
    assert [h.step for h in sorted(store.held(), key=lambda h: h.step)] == [7, 8]
    assert read_back(store) == fragments_of(step_data(8))[0] and read_back(store, step=7) == fragments_of(step_data(7))[0]
    store.stop(remove=False)

    restarted = FragmentStore(shm=shm, prefix=PREFIX, budget=MemoryBudget(limit_bytes=1 << 20), node="b", group=lambda: GROUP)
    assert restarted.adopt() == 2, "the complete fragments survive a restart; the spare, named by no manifest, goes"
    assert read_back(restarted) == fragments_of(step_data(8))[0] and len(segments(shm)) == 2
    restarted.stop(remove=True)
    assert shm.list_names(PREFIX) == []


def test_a_fragment_given_to_a_reader_is_never_written_over(shm: ShmDir) -> None:
    store = FragmentStore(shm=shm, prefix=PREFIX, budget=MemoryBudget(limit_bytes=1 << 20), node="b", group=lambda: GROUP)
    for step in (1, 2):
        put_step(store, step)
    _, served = store.open_fragment("j", 0, 0, 1)  # a rebuild reads step 1 while newer steps keep coming
    for step in range(3, 8):
        put_step(store, step)
    assert bytes(served) == fragments_of(step_data(1))[0]
    store.stop(remove=True)


def test_a_corrupt_upload_into_a_reused_segment_leaves_the_kept_steps_whole(shm: ShmDir) -> None:
    budget = MemoryBudget(limit_bytes=1 << 20)
    store = FragmentStore(shm=shm, prefix=PREFIX, budget=budget, node="b", group=lambda: GROUP)
    for step in (1, 2, 3):
        put_step(store, step)
    data = step_data(4)
    sent = chunks(fragments_of(data)[0], 1000)
    sent[1] = Chunk(data=b"\x00" * len(sent[1].data), crc32c=sent[1].crc32c)  # damaged in transit
    with pytest.raises(CorruptSnapshot):
        store.put(header(data, step=4), sent)
    assert sorted(h.step for h in store.held()) == [2, 3]
    assert read_back(store) == fragments_of(step_data(3))[0] and read_back(store, step=2) == fragments_of(step_data(2))[0]
    assert budget.used_bytes == 2 * FRAGMENT_BYTES and len(segments(shm)) == 2
    store.stop(remove=True)
