"""What the state process tells the front end (`state.py`): how each live node's heartbeat is
answered, when that changes, and reports passed on unparsed. The servicer is called directly."""

from __future__ import annotations

import asyncio
import time

import pytest

from memckpt.coordinator import state, wire
from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.service import CoordinatorServicer
from memckpt.coordinator.wire import held_to_proto
from memckpt.protos import coordinator_pb2 as pb


def cluster_of(nodes: int) -> tuple[Cluster, CoordinatorServicer]:
    cluster = Cluster(k=2, m=1, lease_s=10.0)
    servicer = CoordinatorServicer(cluster, heartbeat_interval_s=1.0, warmup_s=0.0)
    for i in range(nodes):
        join(cluster, f"n{i}", now=0.0)
    return cluster, servicer


def join(cluster: Cluster, node: str, now: float) -> int:
    info = AgentInfo(node=node, address=f"{node}:1", capacity_bytes=1, domain=node)
    incarnation, _ = cluster.register_agent(info, (), now=now)
    return incarnation


def reply_of(servicer: CoordinatorServicer, node: str, incarnation: int) -> pb.HeartbeatResponse:
    return servicer._heartbeat(pb.HeartbeatRequest(node=node, incarnation=incarnation))


def test_the_view_answers_each_live_node_as_a_heartbeat_would() -> None:
    cluster, servicer = cluster_of(8)
    nodes, replies = servicer.heartbeat_view()
    members = cluster.membership.members
    assert set(nodes) == set(members)
    for node, (incarnation, index) in nodes.items():
        assert incarnation == members[node].incarnation
        assert pb.HeartbeatResponse.FromString(replies[index]) == reply_of(servicer, node, incarnation)
    assert len(replies) == len(cluster.groups.groups), "one encoded reply per group"


def test_the_version_changes_with_what_heartbeats_are_answered_and_only_then() -> None:
    cluster, servicer = cluster_of(4)
    version = servicer.view_version()
    report = pb.HeartbeatRequest(held=held_to_proto((Held(job="j", rank=0, step=3, generation=1),)))
    assert servicer.accept_report("n0", cluster.membership.members["n0"].incarnation, report, now=1.0)
    assert servicer.view_version() == version, "a report is answered the same until a refresh"

    asyncio.run(servicer.refresh_async())
    assert servicer.view_version() != version, "job j's protection target"
    (protection,) = pb.HeartbeatResponse.FromString(servicer.heartbeat_view()[1][0]).protection
    assert protection.job == "j"
    version = servicer.view_version()
    join(cluster, "n9", now=1.0)
    assert servicer.view_version() != version, "a registration"
    version = servicer.view_version()
    cluster.tick(now=10.5)  # every lease but n0's and n9's ran out
    assert servicer.view_version() != version, "failures"
    nodes, _ = servicer.heartbeat_view()
    assert set(nodes) == {"n0", "n9"}, "failed nodes must register again"


def test_a_report_passed_on_unparsed_is_filed_as_the_request_would_be() -> None:
    cluster, servicer = cluster_of(4)
    held = (
        Held(job="j", rank=0, step=3, generation=1),
        Held(job="j", rank=1, step=3, generation=1, fragment_indices=(0,), k=2, m=1),
    )
    request = pb.HeartbeatRequest(node="n0", incarnation=cluster.membership.members["n0"].incarnation, held=held_to_proto(held))
    request.memory_used_bytes = 4096
    assert servicer.accept_report("n0", request.incarnation, request.SerializeToString(), now=1.0)
    assert cluster.held["n0"] == held
    assert cluster.memory_used["n0"] == 4096
    assert not servicer.accept_report("n0", request.incarnation + 1, request.SerializeToString(), now=1.0), "another incarnation"


def test_a_report_the_same_as_the_last_filed_costs_no_decoding_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, servicer = cluster_of(4)
    incarnation = cluster.membership.members["n0"].incarnation
    first = (Held(job="j", rank=0, step=3, generation=1),)
    raw = pb.HeartbeatRequest(node="n0", incarnation=incarnation, held=held_to_proto(first)).SerializeToString()
    assert servicer.accept_report("n0", incarnation, raw, now=1.0)
    decoded: list[bytes] = []
    decode = wire.decode_report

    def counted(raw: bytes) -> tuple[tuple[Held, ...], int]:
        decoded.append(raw)
        return decode(raw)

    monkeypatch.setattr(wire, "decode_report", counted)
    assert servicer.accept_report("n0", incarnation, bytes(raw), now=2.0)
    assert decoded == [] and cluster.held["n0"] == first

    second = (Held(job="j", rank=0, step=4, generation=1),)
    changed = pb.HeartbeatRequest(node="n0", incarnation=incarnation, held=held_to_proto(second)).SerializeToString()
    assert servicer.accept_report("n0", incarnation, changed, now=3.0)
    assert decoded == [changed] and cluster.held["n0"] == second


def test_a_report_malformed_past_its_header_is_dropped_and_filing_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """The front end reads only a heartbeat's header: the state process must not fail on the rest."""
    cluster, servicer = cluster_of(4)
    incarnation = cluster.membership.members["n0"].incarnation
    header = pb.HeartbeatHeader(node="n0", incarnation=incarnation).SerializeToString()
    good = (Held(job="j", rank=0, step=3, generation=1),)
    assert servicer.accept_report("n0", incarnation, header + b"\x1a\x40xx", now=1.0)  # an entry cut short
    assert cluster.held["n0"] == () and "report is dropped" in caplog.text
    raw = pb.HeartbeatRequest(node="n0", incarnation=incarnation, held=held_to_proto(good)).SerializeToString()
    assert servicer.accept_report("n0", incarnation, raw, now=2.0)
    assert cluster.held["n0"] == good


@pytest.mark.parametrize("parsed", [True, False], ids=["parsed", "as-it-came"])
def test_a_report_of_a_negative_rank_is_dropped_and_filing_goes_on(caplog: pytest.LogCaptureFixture, parsed: bool) -> None:
    cluster, servicer = cluster_of(4)
    incarnation = cluster.membership.members["n0"].incarnation
    negative = Held(job="j", rank=-3, step=3, generation=1)
    bad = pb.HeartbeatRequest(node="n0", incarnation=incarnation, held=held_to_proto([negative]))
    assert servicer.accept_report("n0", incarnation, bad if parsed else bad.SerializeToString(), now=1.0)
    assert cluster.held["n0"] == () and "rank -3" in caplog.text and "j" not in cluster.jobs
    good = (Held(job="j", rank=0, step=3, generation=1),)
    request = pb.HeartbeatRequest(node="n0", incarnation=incarnation, held=held_to_proto(good))
    assert servicer.accept_report("n0", incarnation, request if parsed else request.SerializeToString(), now=2.0)
    assert cluster.held["n0"] == good and cluster.jobs["j"].world_size == 1


def test_leases_are_not_expired_while_the_heartbeats_are_read_late() -> None:
    """After a stall of the state process, renewals wait unread in its socket: expiring then
    would fail agents that heartbeat on time."""
    expired: list[float] = []
    on_time = False

    class Leases:
        def expire_leases(self) -> None:
            expired.append(time.monotonic())

    async def run() -> None:
        nonlocal on_time
        task = asyncio.create_task(state.expire_leases(Leases(), 0.01, ready=lambda: on_time))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert expired == []
        on_time = True
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert expired, "expired again once the heartbeats are read on time"
