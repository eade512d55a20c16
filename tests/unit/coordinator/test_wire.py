from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.plan import Decision, FragmentSet, RankSource, RecoveryPlan
from memckpt.coordinator.wire import decode_report, encode_plan, held_from_proto, held_to_proto, plan_to_proto
from memckpt.errors import InvalidRequest
from memckpt.protos import coordinator_pb2 as pb

COPY = Held(job="j", rank=0, step=7, generation=2, protected=True)
FRAGMENT = Held(job="j", rank=1, step=7, generation=2, fragment_indices=(0, 2), k=2, m=1, size_bytes=1 << 20)


def test_held_round_trips() -> None:
    assert held_from_proto(held_to_proto([COPY, FRAGMENT])) == (COPY, FRAGMENT)


def test_an_entry_reported_twice_counts_once_and_the_order_is_kept() -> None:
    assert held_from_proto(held_to_proto([FRAGMENT, COPY, FRAGMENT])) == (FRAGMENT, COPY)


def test_an_entry_of_a_negative_rank_is_refused() -> None:
    """A job's world size is learned from the ranks its agents hold: -3 would make it -2."""
    bad = pb.HeartbeatRequest(node="a", held=held_to_proto([COPY, COPY._replace(rank=-3)])).SerializeToString()
    with pytest.raises(InvalidRequest, match="rank -3"):
        decode_report(bad)


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
def test_a_report_decodes_to_the_entries_and_memory_it_was_built_from(held: list[Held], memory: int, node: str) -> None:
    request = pb.HeartbeatRequest(node=node, incarnation=12345, held=held_to_proto(held), memory_used_bytes=memory)
    decoded, memory_used = decode_report(request.SerializeToString())
    assert memory_used == memory
    assert decoded == tuple(dict.fromkeys(held))
    assert all(type(h) is Held for h in decoded)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x1a\x05ab",  # an entry of 5 bytes with 2 left
        b"\x20",  # memory_used's key without its value
        b"\x1b",  # a group never closed
        b"\x20" + b"\xff" * 11,  # a varint longer than 10 bytes
        b"\x00\x01",  # field number 0
        b"\x1a\x02\x08\xff",  # an entry whose rank is cut short
    ],
)
def test_a_malformed_report_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="a malformed heartbeat report"):
        decode_report(raw)


def _plan_as_messages(plan: RecoveryPlan, reason: str, addresses: dict[str, str]) -> pb.GetRecoveryPlanResponse:
    """The plan built message by message: what `encode_plan` must equal, byte for byte."""
    sources = []
    for source in plan.sources:
        message = pb.RankSource(
            rank=source.rank, copies=[pb.AgentDescription(node=n, address=addresses.get(n, "")) for n in source.copies]
        )
        if (f := source.fragments) is not None:
            message.k, message.m, message.size_bytes = f.k, f.m, f.size_bytes
            message.fragments.extend(pb.FragmentHolder(index=i, node=n, address=addresses.get(n, "")) for i, n in f.holders)
        sources.append(message)
    return pb.GetRecoveryPlanResponse(has_plan=True, step=plan.step, sources=sources, reason=reason)


nodes = st.sampled_from([f"node-{i}" for i in range(6)])
fragment_sets = st.builds(
    FragmentSet,
    step=st.integers(0, 1 << 40),
    k=st.integers(0, 300),
    m=st.integers(0, 300),
    size_bytes=st.integers(0, 1 << 62),
    holders=st.lists(st.tuples(st.integers(0, 300), nodes), max_size=6).map(tuple),
)
sources = st.builds(
    RankSource,
    rank=st.integers(0, 1 << 30),
    copies=st.lists(nodes, max_size=3).map(tuple),
    fragments=st.none() | fragment_sets,
)


@given(
    st.lists(sources, max_size=20),
    st.integers(0, 1 << 62),
    st.text(max_size=300),
    st.dictionaries(nodes, st.text(max_size=200)),
)
@settings(max_examples=200, deadline=None)
def test_an_encoded_plan_is_the_bytes_protobuf_gives(
    ranks: list[RankSource], step: int, reason: str, addresses: dict[str, str]
) -> None:
    plan = RecoveryPlan(step=step, sources=tuple(ranks))
    expected = _plan_as_messages(plan, reason, addresses)
    assert encode_plan(plan, reason, addresses) == expected.SerializeToString()
    assert plan_to_proto(Decision(plan=plan, reason=reason), addresses) == expected


def test_a_decision_without_a_plan_says_why() -> None:
    reply = plan_to_proto(Decision(plan=None, reason="memory cannot restore the job: ranks [3]"), {})
    assert not reply.has_plan and reply.step == -1 and reply.sources == [] and "ranks [3]" in reply.reason
