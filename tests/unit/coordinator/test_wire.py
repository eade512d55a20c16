from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.wire import InventoryDecoder, held_from_proto, held_to_proto, scan_report
from memckpt.errors import InvalidRequest
from memckpt.protos import coordinator_pb2 as pb

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


held_entries = st.builds(
    Held,
    job=st.text(alphabet="abcxyz-_.0123456789", min_size=1, max_size=40),
    rank=st.integers(0, 1 << 20),
    step=st.integers(0, 1 << 40),
    generation=st.integers(0, 1 << 31),
    fragment_indices=st.lists(st.integers(0, 255), max_size=4).map(tuple),
    k=st.integers(0, 255),
    m=st.integers(0, 255),
    size_bytes=st.integers(0, 1 << 62),
    protected=st.booleans(),
)


@given(st.lists(held_entries, max_size=30), st.integers(0, (1 << 64) - 1), st.text(min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_a_scanned_report_decodes_to_what_the_parsed_request_holds(held: list[Held], memory: int, node: str) -> None:
    request = pb.HeartbeatRequest(node=node, incarnation=12345, held=held_to_proto(held), memory_used_bytes=memory)
    entries, memory_used = scan_report(request.SerializeToString())
    assert memory_used == memory
    assert InventoryDecoder().decode_encoded("a", entries) == InventoryDecoder().decode("a", request.held)


def test_the_decoder_reuses_entries_as_they_came_on_the_wire() -> None:
    decoder = InventoryDecoder()
    report = pb.HeartbeatRequest(node="a", held=held_to_proto([COPY, FRAGMENT])).SerializeToString()
    first = decoder.decode_encoded("a", scan_report(report)[0])
    again = decoder.decode_encoded("a", scan_report(report)[0])
    assert first == (COPY, FRAGMENT) and all(x is y for x, y in zip(first, again, strict=True))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x1a\x05ab", "runs past the report's end"),  # an entry of 5 bytes with 2 left
        (b"\x20", "ends in the middle of a field"),  # memory_used's key without its value
        (b"\x1b", "wire type 3"),  # a group: never in a report
        (b"\x20" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x20" + b"\xff" * 9 + b"\x7f", "more than 64 bits"),  # protobuf would cut it to 64 bits
        (b"\x00\x01", "field number 0"),
    ],
)
def test_a_malformed_report_is_refused_precisely(raw: bytes, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        scan_report(raw)


def test_a_malformed_entry_is_refused_when_decoded() -> None:
    with pytest.raises(InvalidRequest, match="malformed inventory entry"):
        InventoryDecoder().decode_encoded("a", [b"\x08\xff"])
