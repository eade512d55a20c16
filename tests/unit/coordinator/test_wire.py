from __future__ import annotations

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.wire import InventoryDecoder, held_from_proto, held_to_proto

COPY = Held(job="j", rank=0, step=7, generation=2, protected=True)
FRAGMENT = Held(job="j", rank=1, step=7, generation=2, fragment_indices=(0, 2), k=2, m=1, size_bytes=1 << 20)


def test_held_round_trips() -> None:
    assert held_from_proto(held_to_proto([COPY, FRAGMENT])) == (COPY, FRAGMENT)


def test_the_decoder_reuses_the_entries_a_node_reported_before_and_only_those() -> None:
    decoder = InventoryDecoder()
    first = decoder.decode("a", held_to_proto([COPY, FRAGMENT]))
    assert first == (COPY, FRAGMENT)
    newer = Held(job="j", rank=0, step=8, generation=2)
    second = decoder.decode("a", held_to_proto([newer, FRAGMENT]))
    assert second == (newer, FRAGMENT) and second[1] is first[1], "unchanged: the same object"
    assert decoder.decode("b", held_to_proto([FRAGMENT]))[0] is not first[1], "another node's entries are its own"
    assert decoder.decode("a", held_to_proto([COPY]))[0] is not first[0], "only the last report is remembered"
    assert decoder.decode("a", []) == ()
