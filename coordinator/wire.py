"""Conversions between the coordinator's data (dataclasses, named tuples) and its protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.drain import DrainProgress
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.plan import Decision, RankSource, RecoveryPlan
from memckpt.errors import InvalidRequest
from memckpt.protos import coordinator_pb2 as pb


def agent_from_proto(message: pb.AgentDescription) -> AgentInfo:
    if not message.address or ":" not in message.address:
        raise InvalidRequest(f"agent {message.node!r}: address {message.address!r} must be host:port")
    return AgentInfo(
        node=message.node, address=message.address, capacity_bytes=message.capacity_bytes, domain=message.domain or "default"
    )


def agent_to_proto(info: AgentInfo, draining: bool = False) -> pb.AgentDescription:
    return pb.AgentDescription(
        node=info.node, address=info.address, capacity_bytes=info.capacity_bytes, domain=info.domain, draining=draining
    )


def drain_to_proto(status: DrainProgress) -> pb.DrainStatus:
    return pb.DrainStatus(
        node=status.node,
        alive=status.alive,
        draining=status.draining,
        drained=status.drained,
        fragment_sets_held=status.fragment_sets_held,
        ranks_owned=status.ranks_owned,
        ranks_protected=status.ranks_protected,
        reason=status.reason,
    )


def drain_from_proto(message: pb.DrainStatus) -> DrainProgress:
    return DrainProgress(
        node=message.node,
        alive=message.alive,
        draining=message.draining,
        drained=message.drained,
        fragment_sets_held=message.fragment_sets_held,
        ranks_owned=message.ranks_owned,
        ranks_protected=message.ranks_protected,
        reason=message.reason,
    )


def held_from_proto(messages: Iterable[pb.HeldSnapshot]) -> tuple[Held, ...]:
    """The entries of an inventory; an entry reported twice counts once. Built as tuples, not
    through Held's keywords: a coordinator of 2,000 agents builds 80,000 at each refresh (at
    40 entries a report, 110 us a report parsed whole, against 290 us recognizing unchanged
    entries by their bytes and building only the others)."""
    new, indices = tuple.__new__, _indices
    entries = [
        new(Held, (h.job, h.rank, h.step, h.generation, indices(h.fragment_indices), h.k, h.m, h.size_bytes, h.protected))
        for h in messages
    ]
    if entries and min(map(_RANK, entries)) < 0:
        raise InvalidRequest(f"an inventory entry of rank {min(map(_RANK, entries))}: ranks are counted from 0")
    return tuple(dict.fromkeys(entries))


_RANK = itemgetter(1)  # of a Held
_ONE_INDEX = {i: (i,) for i in range(256)}  # most fragment entries hold one fragment


def _indices(repeated: Sequence[int]) -> tuple[int, ...]:
    if not repeated:
        return ()
    if len(repeated) == 1 and (one := _ONE_INDEX.get(repeated[0])) is not None:
        return one
    return tuple(repeated)


def decode_report(raw: bytes) -> tuple[tuple[Held, ...], int]:
    """A HeartbeatRequest's inventory and memory_used_bytes, as it came on the wire (the front
    end of `state.py` passes reports on unparsed). Raises InvalidRequest when malformed."""
    try:
        request = pb.HeartbeatRequest.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError
        raise InvalidRequest(f"a malformed heartbeat report: {exc}") from exc
    return held_from_proto(request.held), request.memory_used_bytes


def held_to_proto(held: Iterable[Held]) -> list[pb.HeldSnapshot]:
    return [
        pb.HeldSnapshot(
            job=h.job,
            rank=h.rank,
            step=h.step,
            generation=h.generation,
            fragment_indices=list(h.fragment_indices),
            k=h.k,
            m=h.m,
            size_bytes=h.size_bytes,
            protected=h.protected,
        )
        for h in held
    ]


def plan_to_proto(decision: Decision, addresses: dict[str, str]) -> pb.GetRecoveryPlanResponse:
    if decision.plan is None:
        return pb.GetRecoveryPlanResponse(has_plan=False, step=-1, reason=decision.reason)
    return pb.GetRecoveryPlanResponse.FromString(encode_plan(decision.plan, decision.reason, addresses))


def encode_plan(plan: RecoveryPlan, reason: str, addresses: dict[str, str]) -> bytes:
    """A GetRecoveryPlanResponse's encoding, the bytes protobuf gives, joined from pieces encoded
    once: every holder's (node, address) and every fragment scheme repeat from rank to rank. A
    plan of 16,000 ranks took 250 ms as messages, and is asked while the whole job waits.
    (A message's encoding is its fields' encodings in field order, and a repeated message
    field is one length-delimited field per element: RankSource's are joined in that order.)"""
    copies: dict[str, bytes] = {}
    holders: dict[tuple[int, str], bytes] = {}
    schemes: dict[tuple[int, int, int], bytes] = {}
    parts = [pb.GetRecoveryPlanResponse(has_plan=True, step=plan.step).SerializeToString()]
    for source in plan.sources:
        body = [_RANK_KEY + _encode_varint(source.rank)] if source.rank else []
        for node in source.copies:
            if (piece := copies.get(node)) is None:
                described = pb.AgentDescription(node=node, address=addresses.get(node, "")).SerializeToString()
                piece = copies[node] = _field(_COPIES_KEY, described)
            body.append(piece)
        if (f := source.fragments) is not None:
            for held in f.holders:
                if (piece := holders.get(held)) is None:
                    index, node = held
                    holder = pb.FragmentHolder(index=index, node=node, address=addresses.get(node, "")).SerializeToString()
                    piece = holders[held] = _field(_FRAGMENTS_KEY, holder)
                body.append(piece)
            if (piece := schemes.get(scheme := (f.k, f.m, f.size_bytes))) is None:
                piece = schemes[scheme] = pb.RankSource(k=f.k, m=f.m, size_bytes=f.size_bytes).SerializeToString()
            body.append(piece)
        parts.append(_field(_SOURCES_KEY, b"".join(body)))
    parts.append(pb.GetRecoveryPlanResponse(reason=reason).SerializeToString())
    return b"".join(parts)


# keys (field number << 3 | wire type) of the fields `encode_plan` writes itself (coordinator.proto)
_RANK_KEY = b"\x08"  # RankSource.rank, varint
_COPIES_KEY = b"\x12"  # RankSource.copies, length-delimited
_FRAGMENTS_KEY = b"\x1a"  # RankSource.fragments
_SOURCES_KEY = b"\x1a"  # GetRecoveryPlanResponse.sources


def _field(key: bytes, payload: bytes) -> bytes:
    return key + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    """A non-negative integer's varint (a negative int32 would take ten bytes: none is written here)."""
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]
    if value < 0:
        raise ValueError(f"a negative varint: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes((i,)) for i in range(0x80)]


def location_to_proto(step: int, source: RankSource, addresses: dict[str, str]) -> pb.SnapshotLocation:
    message = pb.SnapshotLocation(
        step=step, copies=[pb.AgentDescription(node=n, address=addresses.get(n, "")) for n in source.copies]
    )
    if source.fragments is not None:
        f = source.fragments
        message.k, message.m, message.size_bytes, message.generation = f.k, f.m, f.size_bytes, f.generation
        message.fragments.extend(pb.FragmentHolder(index=i, node=n, address=addresses.get(n, "")) for i, n in f.holders)
    return message
