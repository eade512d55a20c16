"""The servicer's own logic, called directly (no gRPC): when reported inventories are filed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from memckpt.coordinator import service
from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.service import FILE_INLINE_MAX_AGENTS, CoordinatorServicer
from memckpt.coordinator.wire import held_to_proto
from memckpt.protos import coordinator_pb2 as pb


def own(rank: int, step: int) -> Held:
    return Held(job="j", rank=rank, step=step, generation=1, protected=True)


def large_cluster() -> tuple[Cluster, CoordinatorServicer]:
    """More agents than are filed inline: heartbeats' inventories wait for a refresh or a read."""
    cluster = Cluster(k=2, m=1, lease_s=100.0)
    servicer = CoordinatorServicer(cluster, heartbeat_interval_s=1.0, warmup_s=0.0)
    for i in range(FILE_INLINE_MAX_AGENTS + 1):
        node = f"n{i:03d}"
        cluster.register_agent(AgentInfo(node=node, address=f"{node}:1", capacity_bytes=1, domain=node), (), now=0.0)
    return cluster, servicer


def beat(cluster: Cluster, servicer: CoordinatorServicer, node: str, *held: Held) -> None:
    incarnation = cluster.membership.members[node].incarnation
    assert servicer._heartbeat(pb.HeartbeatRequest(node=node, incarnation=incarnation, held=held_to_proto(held))).accepted


def both_ranks_at(cluster: Cluster, servicer: CoordinatorServicer, *steps: int) -> None:
    """Rank 0 on n000 and rank 1 on n001 hold `steps` (no fragments: whole copies only)."""
    beat(cluster, servicer, "n000", *(own(0, s) for s in steps))
    beat(cluster, servicer, "n001", *(own(1, s) for s in steps))


def ask(method: Any, request: Any) -> Any:
    return asyncio.run(method(request, None))  # no context: these calls succeed


def test_a_plan_is_pinned_over_every_report_made_before_it() -> None:
    """A refresh may be seconds behind: a plan files what is pending before it is pinned, even
    right after another read filed (reports of different ages can hold no step in common; here
    the filed ones alone would pin step 5 for the whole generation, though every rank holds 7)."""
    cluster, servicer = large_cluster()
    beat(cluster, servicer, "n000", own(0, 4), own(0, 5))
    beat(cluster, servicer, "n001", own(1, 4), own(1, 5))
    ask(servicer.LocateSnapshots, pb.LocateSnapshotsRequest(job="j", rank=0))  # files both
    beat(cluster, servicer, "n000", own(0, 6), own(0, 7))  # rank 0 went on; not filed yet
    generation = cluster.start_generation("j", 2, previous=1)
    beat(cluster, servicer, "n001", own(1, 6), own(1, 7))
    assert cluster.held["n001"] == (own(1, 4), own(1, 5))

    plan = ask(servicer.GetRecoveryPlan, pb.GetRecoveryPlanRequest(job="j", generation=generation))
    assert plan.has_plan and plan.step == 7, plan.reason


def test_reads_file_pending_reports_at_most_once_a_heartbeat_interval() -> None:
    """Every rank of a restarted job locates its snapshots: the reads file each node's report
    no more often than its agent sends one (here the interval is 1 s)."""
    cluster, servicer = large_cluster()
    both_ranks_at(cluster, servicer, 4, 5)
    located = ask(servicer.LocateSnapshots, pb.LocateSnapshotsRequest(job="j", rank=0))
    assert [loc.step for loc in located.locations] == [5, 4]  # filed by the read
    beat(cluster, servicer, "n000", own(0, 6))
    located = ask(servicer.LocateSnapshots, pb.LocateSnapshotsRequest(job="j", rank=0))
    assert [loc.step for loc in located.locations] == [5, 4], "filed again within the interval"
    servicer._filed_at -= 1.0  # an interval later
    located = ask(servicer.LocateSnapshots, pb.LocateSnapshotsRequest(job="j", rank=0))
    assert [loc.step for loc in located.locations] == [6]


def test_a_pinned_plan_is_answered_again_without_rebuilding_its_reply() -> None:
    cluster, servicer = large_cluster()
    both_ranks_at(cluster, servicer, 5)
    servicer.tick()
    generation = cluster.start_generation("j", 2, previous=1)
    request = pb.GetRecoveryPlanRequest(job="j", generation=generation)
    first = ask(servicer.GetRecoveryPlan, request)
    assert ask(servicer.GetRecoveryPlan, request) is first
    assert [s.rank for s in first.sources] == [0, 1] and first.sources[1].copies[0].address == "n001:1"


def test_a_refresh_never_files_an_older_report_over_one_a_read_filed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh files the pending reports a slice at a time, resting between slices; a read
    in a rest files the rest, newer ones included: the refresh must not then file the older
    ones it saw pending when it began."""
    monkeypatch.setattr(service, "FILE_NODES_PER_STEP", 1)
    cluster, servicer = large_cluster()
    both_ranks_at(cluster, servicer, 5)

    async def scenario() -> None:
        refresh = asyncio.create_task(servicer.refresh_async())
        await asyncio.sleep(0)  # the refresh filed its first slice (n000) and rests
        assert cluster.held["n000"] == (own(0, 5),) and cluster.held.get("n001", ()) == ()
        beat(cluster, servicer, "n001", own(1, 6))
        await servicer.GetClusterStatus(pb.GetClusterStatusRequest(), None)  # files every pending report
        assert cluster.held["n001"] == (own(1, 6),)
        await refresh
        assert cluster.held["n001"] == (own(1, 6),)
        assert servicer._pending == {}

    asyncio.run(scenario())
