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
    so that `Cluster` sees at once which ranks changed. An entry is recognized by its encoding
    (serializing a small message costs a fraction of decoding it)."""

    def __init__(self) -> None:
        self._last: dict[str, dict[bytes, Held]] = {}  # node -> encoding -> entry, of its last report

    def decode(self, node: str, messages: Iterable[pb.HeldSnapshot]) -> tuple[Held, ...]:
        last = self._last.get(node, {})
        current: dict[bytes, Held] = {}  # an entry reported twice counts once
        for message in messages:
            encoded = message.SerializeToString()
            current[encoded] = last.get(encoded) or _held_from_proto(message)
        self._last[node] = current
        return tuple(current.values())


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
