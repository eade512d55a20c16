"""Conversions between the coordinator's dataclasses and its protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.drain import DrainProgress
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.plan import Decision, RankSource
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
    return tuple(_held_from_proto(h) for h in messages)


def _held_from_proto(h: pb.HeldSnapshot) -> Held:
    return Held(
        job=h.job,
        rank=h.rank,
        step=h.step,
        generation=h.generation,
        fragment_indices=tuple(h.fragment_indices),
        k=h.k,
        m=h.m,
        size_bytes=h.size_bytes,
        protected=h.protected,
    )


class InventoryDecoder:
    """`held_from_proto` for nodes that report their whole inventory again and again: an entry
    a node reported in its previous report is not decoded again, and is the same `Held` object,
    so that `Cluster` sees at once which ranks changed. An entry is recognized by its encoding:
    as it came (`decode_encoded`, with `scan_report`), or serialized again (`decode`; a
    fraction of the cost of decoding it)."""

    def __init__(self) -> None:
        self._last: dict[str, dict[bytes, Held]] = {}  # node -> encoding -> entry, of its last report

    def decode(self, node: str, messages: Iterable[pb.HeldSnapshot]) -> tuple[Held, ...]:
        return self._decode(node, ((message.SerializeToString(), message) for message in messages))

    def decode_encoded(self, node: str, entries: Iterable[bytes]) -> tuple[Held, ...]:
        """`decode` of entries as they came on the wire; raises InvalidRequest for a malformed one."""
        return self._decode(node, ((entry, None) for entry in entries))

    def _decode(self, node: str, entries: Iterable[tuple[bytes, pb.HeldSnapshot | None]]) -> tuple[Held, ...]:
        last = self._last.get(node, {})
        current: dict[bytes, Held] = {}  # an entry reported twice counts once
        for encoded, message in entries:
            held = last.get(encoded)
            if held is None:
                if message is None:
                    try:
                        message = pb.HeldSnapshot.FromString(encoded)
                    except Exception as exc:  # protobuf's DecodeError
                        raise InvalidRequest(f"node {node!r}: a malformed inventory entry: {exc}") from exc
                held = _held_from_proto(message)
            current[encoded] = held
        self._last[node] = current
        return tuple(current.values())


# HeartbeatRequest's fields that `scan_report` reads (see coordinator.proto)
HELD_FIELD = 3
MEMORY_USED_FIELD = 4


def scan_report(raw: bytes) -> tuple[list[bytes], int]:
    """A HeartbeatRequest's inventory entries, each as encoded, and its memory_used_bytes, read
    off the wire without building a message per entry: at 40 entries a report, wrapping each
    in a message and encoding it again to recognize it took 450 us, most of what filing a
    report costs. Raises InvalidRequest for a malformed encoding."""
    entries: list[bytes] = []
    memory_used = 0
    end = len(raw)
    i = 0
    try:
        while i < end:
            key, i = _varint(raw, i)
            field, kind = key >> 3, key & 7
            if field == 0:
                raise InvalidRequest("field number 0 is not in a heartbeat report")
            if kind == 2:  # length-delimited: strings, messages
                size, i = _varint(raw, i)
                if i + size > end:
                    raise InvalidRequest(f"a field {field} of {size} bytes runs past the report's end")
                if field == HELD_FIELD:
                    entries.append(raw[i : i + size])
                i += size
            elif kind == 0:
                value, i = _varint(raw, i)
                if field == MEMORY_USED_FIELD:
                    memory_used = value
            elif kind in (1, 5):  # fixed 64 or 32 bits (none in a report today; skipped)
                i += 8 if kind == 1 else 4
            else:
                raise InvalidRequest(f"wire type {kind} (field {field}) is not in a heartbeat report")
    except IndexError:
        raise InvalidRequest("the report ends in the middle of a field") from None
    if i != end:
        raise InvalidRequest("the report ends in the middle of a field")
    return entries, memory_used


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i:] and the index after it (IndexError when it runs past the end)."""
    byte = data[i]
    if byte < 0x80:
        return byte, i + 1
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise InvalidRequest("a varint of more than 64 bits")
            return value, i
        shift += 7
        if shift > 63:
            raise InvalidRequest("a varint longer than 10 bytes")


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
    sources = []
    for source in decision.plan.sources:
        message = pb.RankSource(
            rank=source.rank, copies=[pb.AgentDescription(node=n, address=addresses.get(n, "")) for n in source.copies]
        )
        if source.fragments is not None:
            f = source.fragments
            message.k, message.m, message.size_bytes = f.k, f.m, f.size_bytes
            message.fragments.extend(pb.FragmentHolder(index=i, node=n, address=addresses.get(n, "")) for i, n in f.holders)
        sources.append(message)
    return pb.GetRecoveryPlanResponse(has_plan=True, step=decision.plan.step, sources=sources, reason=decision.reason)


def location_to_proto(step: int, source: RankSource, addresses: dict[str, str]) -> pb.SnapshotLocation:
    message = pb.SnapshotLocation(
        step=step, copies=[pb.AgentDescription(node=n, address=addresses.get(n, "")) for n in source.copies]
    )
    if source.fragments is not None:
        f = source.fragments
        message.k, message.m, message.size_bytes, message.generation = f.k, f.m, f.size_bytes, f.generation
        message.fragments.extend(pb.FragmentHolder(index=i, node=n, address=addresses.get(n, "")) for i, n in f.holders)
    return message
