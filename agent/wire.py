"""Conversions between the agent's dataclasses and its protobuf messages."""

from __future__ import annotations

from memckpt.agent.slots import RankSlots, SlotState
from memckpt.agent.store import DirectFragment, DirectPlan, RestoreSource, SlotGrant
from memckpt.errors import InvalidRequest
from memckpt.protos import agent_pb2 as pb

_STATE = {
    SlotState.FREE: pb.SLOT_STATE_FREE,
    SlotState.WRITING: pb.SLOT_STATE_WRITING,
    SlotState.COMMITTED: pb.SLOT_STATE_COMMITTED,
}
STATE_NAMES = {v: k.value for k, v in _STATE.items()}


def rank_status(slots: RankSlots, names: list[str]) -> pb.RankStatus:
    latest = slots.latest_committed()
    return pb.RankStatus(
        job=slots.key.job,
        rank=slots.key.rank,
        world_size=slots.world_size,
        has_committed=latest is not None,
        committed_step=latest.step if latest else -1,
        slots=[
            pb.SlotStatus(
                index=s.index,
                name=name,
                state=_STATE[s.state],
                step=s.step,
                size_bytes=s.size_bytes,
                data_size_bytes=s.data_size_bytes,
                checksum_ready=s.checksums is not None,
            )
            for s, name in zip(slots.slots, names)
        ],
    )


def grant_to_proto(grant: SlotGrant) -> pb.BeginSnapshotResponse:
    return pb.BeginSnapshotResponse(slot_index=grant.index, slot_name=grant.name, slot_size_bytes=grant.size_bytes)


def restore_to_proto(source: RestoreSource) -> pb.OpenRestoreResponse:
    return pb.OpenRestoreResponse(
        step=source.step,
        slot_name=source.name,
        slot_size_bytes=source.size_bytes,
        data_size_bytes=source.data_size_bytes,
        meta=source.meta,
        checksums=source.checksums,
        source=source.source,
    )


def direct_to_proto(plan: DirectPlan) -> pb.OpenRestoreResponse:
    return pb.OpenRestoreResponse(
        step=plan.step,
        data_size_bytes=plan.data_size_bytes,
        meta=plan.meta,
        checksums=plan.checksums,
        source="fragments",
        direct=[
            pb.DirectFragment(
                index=f.index,
                node=f.node,
                host=f.host,
                port=f.port,
                ticket=f.ticket,
                fragment_bytes=plan.fragment_bytes,
            )
            for f in plan.fragments
        ],
    )


def restore_from_proto(response: pb.OpenRestoreResponse) -> RestoreSource:
    direct = None
    if response.direct:
        sizes = {f.fragment_bytes for f in response.direct}
        if len(sizes) != 1:
            raise InvalidRequest(f"a direct restore's fragments differ in size: {sorted(sizes)}")
        direct = DirectPlan(
            step=response.step,
            data_size_bytes=response.data_size_bytes,
            fragment_bytes=sizes.pop(),
            meta=response.meta,
            checksums=tuple(response.checksums),
            fragments=tuple(
                DirectFragment(index=f.index, node=f.node, host=f.host, port=f.port, ticket=f.ticket) for f in response.direct
            ),
        )
    return RestoreSource(
        step=response.step,
        name=response.slot_name,
        size_bytes=response.slot_size_bytes,
        data_size_bytes=response.data_size_bytes,
        meta=response.meta,
        checksums=tuple(response.checksums),
        source=response.source or "local",
        direct=direct,
    )
