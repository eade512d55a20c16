from __future__ import annotations

import pytest

from memckpt.agent.manifest import decode_manifest, encode_manifest
from memckpt.agent.slots import RankKey, new_rank_slots
from memckpt.errors import CorruptSnapshot


def sample():  # noqa: ANN201
    slots = new_rank_slots(RankKey(job="job-1", rank=3), 4, 1 << 20)
    slot, _ = slots.begin(7, 1 << 20)
    slots.commit(slot.index, 7, 1000, b'{"tree": 1}')
    slots.set_checksums(slot.index, slots.slots[slot.index].commit_id, (11, 22))
    slots.begin(8, 2 << 20)
    return slots


def test_manifest_round_trips() -> None:
    slots = sample()
    back = decode_manifest(encode_manifest(slots))
    assert back.key == slots.key and back.world_size == 4
    assert back.slots == slots.slots
    assert back.latest == slots.latest and back.commits == slots.commits


@pytest.mark.parametrize("damage", [lambda b: b[:-3], lambda b: b.replace(b"job-1", b"job-2"), lambda b: b"x" + b])
def test_damaged_manifest_is_rejected(damage) -> None:  # noqa: ANN001
    with pytest.raises(CorruptSnapshot):
        decode_manifest(damage(encode_manifest(sample())))
