from __future__ import annotations

import json
import zlib

import pytest

from memckpt.agent.manifest import MAGIC, decode_manifest, encode_manifest
from memckpt.agent.slots import RankKey, new_rank_slots
from memckpt.errors import CorruptSnapshot


def sample():  # noqa: ANN201
    slots = new_rank_slots(RankKey(job="job-1", rank=3), 4, 1 << 20)
    slot, _ = slots.begin(7, 1 << 20)
    slots.commit(slot.index, 7, 1000, b'{"tree": 1}')
    slots.set_checksums(slot.index, slots.slots[slot.index].commit_id, (11, 22))
    slots.set_protected(slot.index, slots.slots[slot.index].commit_id, ("node1", "node2", "node3"))
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


def test_a_manifest_of_an_older_agent_reads_with_holders_not_known() -> None:
    data = encode_manifest(sample())
    body = json.loads(data[len(MAGIC) :].rpartition(b"\n")[0])
    for slot in body["slots"]:
        del slot["protected_by"]
    raw = json.dumps(body, sort_keys=True).encode()
    back = decode_manifest(MAGIC + raw + b"\n" + f"{zlib.crc32(raw):08x}".encode())
    assert [s.protected_by for s in back.slots] == [(), ()] and any(s.protected for s in back.slots)
