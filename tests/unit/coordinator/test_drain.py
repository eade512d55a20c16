"""Draining a node: when the coordinator lets it start, how its fragments stop counting, and when it is done."""

from __future__ import annotations

import pytest

from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.drain import DrainProgress, check_can_drain, drain_progress
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.protection import RankProgress
from memckpt.coordinator.wire import drain_from_proto, drain_to_proto
from memckpt.errors import FailedPrecondition, InvalidRequest, NotFound


def info(node: str) -> AgentInfo:
    return AgentInfo(node=node, address=f"{node}:7000", capacity_bytes=1 << 30, domain=f"rack-{node}")


def own(rank: int, step: int = 9) -> Held:
    return Held(job="j", rank=rank, step=step, generation=1, protected=True)


def frag(rank: int, index: int, step: int = 9) -> Held:
    return Held(job="j", rank=rank, step=step, generation=1, fragment_indices=(index,), k=2, m=1, size_bytes=64)


# rank 0 on a (fragments on b, c, e), rank 1 on b (fragments on c, d, e), rank 2 on e (fragments on a, b, c)
HELD = {
    "a": (own(0), frag(2, 0)),
    "b": (own(1), frag(0, 0), frag(2, 1)),
    "c": (frag(0, 1), frag(1, 0), frag(2, 2)),
    "d": (frag(1, 1),),
    "e": (own(2), frag(0, 2), frag(1, 2)),
}


def cluster_of_five() -> Cluster:
    cluster = Cluster(k=2, m=1, lease_s=3.0)
    for node, entries in HELD.items():
        cluster.register_agent(info(node), entries, now=0.0, instance=1)
    assert cluster.refresh_protection()["j"].keep == 9
    return cluster


def report(cluster: Cluster, node: str, *entries: Held, now: float = 1.0) -> None:
    assert cluster.heartbeat(node, cluster.membership.members[node].incarnation, entries, now=now)


def test_drain_moves_protection_off_the_node_and_finishes_when_it_holds_nothing_others_need() -> None:
    cluster = cluster_of_five()
    assert cluster.drain("e") is False
    assert cluster.groups.draining == {"e"} and cluster.groups.group_of("e") is not None, "e still owns rank 2"
    status = cluster.drain_status("e")
    assert not status.drained and "not in force yet" in status.reason, "not judged on counts made before the drain"
    assert cluster.announced_draining == frozenset(), "e hears of its drain only with a kept step counted without it"
    protection = cluster.refresh_protection()["j"]
    assert cluster.announced_draining == {"e"}
    assert protection.keep == -1, "e's fragments no longer count: ranks 0 and 1 lack one"
    assert protection.target == 9, "the job stands still: its newest step is protected again"
    status = cluster.drain_status("e")
    assert (status.fragment_sets_held, status.ranks_owned, status.ranks_protected) == (2, 1, 1)
    assert not status.drained and "2 fragment set(s)" in status.reason and "job 'j' rank 0 step 9" in status.reason
    # the owners protect step 9 again with e's fragments on d and a; e drops its own once the kept step is there
    report(cluster, "d", frag(1, 1), frag(0, 2))
    report(cluster, "a", own(0), frag(2, 0), frag(1, 2))
    assert cluster.refresh_protection()["j"].keep == 9
    assert not cluster.drain_status("e").drained, "e still holds its old fragments"
    report(cluster, "e", own(2))
    cluster.refresh_protection()
    status = cluster.drain_status("e")
    assert status.drained and (status.fragment_sets_held, status.ranks_protected) == (0, 1)
    assert status.reason == "e is drained: it holds nothing others need; it can be stopped"


def test_drain_asked_again_is_unchanged_and_undo_makes_the_node_a_holder_again() -> None:
    cluster = cluster_of_five()
    assert cluster.drain("e") is False and cluster.drain("e") is True
    cluster.undo_drain("e")
    assert cluster.groups.draining == frozenset() and not cluster.drain_status("e").draining
    assert cluster.refresh_protection()["j"].keep == 9, "its fragments count again"
    with pytest.raises(FailedPrecondition, match="e is not being drained: there is nothing to undo"):
        cluster.undo_drain("e")


def test_drain_refuses_unknown_failed_and_badly_named_nodes() -> None:
    cluster = cluster_of_five()
    with pytest.raises(NotFound, match=r"no agent named 'x' has registered with this coordinator \(known: a, b, c, d, e\)"):
        cluster.drain("x")
    with pytest.raises(InvalidRequest):
        cluster.drain("../e")
    for node in "abcd":
        report(cluster, node, *HELD[node], now=2.0)
    assert cluster.tick(now=4.0).failed == ("e",)
    with pytest.raises(FailedPrecondition, match="e has failed"):
        cluster.drain("e")


def test_drain_refuses_to_leave_too_few_agents_to_form_a_group() -> None:
    cluster = cluster_of_five()
    cluster.drain("e")
    with pytest.raises(FailedPrecondition, match=r"draining d would leave 3 agent\(s\) to hold fragments \(a, b, c\)"):
        cluster.drain("d")
    assert cluster.groups.draining == {"e"}, "a refused drain changes nothing"


def test_a_restarted_agent_ends_the_drain_of_its_node() -> None:
    cluster = cluster_of_five()
    cluster.drain("e")
    _, change = cluster.register_agent(info("e"), HELD["e"], now=1.0, instance=1)
    assert cluster.groups.draining == {"e"} and not change.undrained, "the same process registering again"
    _, change = cluster.register_agent(info("e"), HELD["e"], now=1.0, instance=2)
    assert cluster.groups.draining == frozenset() and change.undrained == ("e",)


def test_drain_progress_names_what_it_waits_for() -> None:
    progress = {"j": {0: RankProgress(committed=frozenset({9})), 1: RankProgress(complete=frozenset({9}))}}

    def judge(*held: Held, keep: int, alive: bool = True) -> DrainProgress:
        return drain_progress(
            "n", alive=alive, draining=True, not_applied="", held=held, generations={"j": 1}, progress=progress, keeps={"j": keep}
        )

    waiting = judge(own(0), own(1), frag(5, 0), keep=-1)
    assert (waiting.fragment_sets_held, waiting.ranks_owned, waiting.ranks_protected, waiting.drained) == (1, 2, 1, False)
    assert "1 fragment set(s) of other nodes' ranks still held (job 'j' rank 5 step 9)" in waiting.reason
    assert "1 of its 2 rank(s) not yet protected by other agents (job 'j' rank 0)" in waiting.reason
    progress["j"][0] = RankProgress(complete=frozenset({8}))
    no_keep = judge(own(0), own(1), keep=-1)
    assert not no_keep.drained and "no step protected for every rank without it yet in job(s) 'j'" in no_keep.reason
    done = judge(own(0), own(1), Held(job="j", rank=3, step=2, generation=0), keep=8)
    assert done.drained and done.ranks_owned == 2, "a rank of an earlier attempt is no one's to protect"
    failed = judge(keep=8, alive=False)
    assert not failed.drained and "has failed" in failed.reason


def test_check_can_drain_needs_a_whole_group_among_the_others() -> None:
    check_can_drain("n", ["a", "b", "c", "d"], k=2, m=1)
    with pytest.raises(FailedPrecondition, match=r"a protection group needs 4 \(k=2, m=1\)"):
        check_can_drain("n", ["a", "b", "c"], k=2, m=1)


def test_drain_status_round_trips() -> None:
    cluster = cluster_of_five()
    cluster.drain("e")
    cluster.refresh_protection()
    status = cluster.drain_status("e")
    assert drain_from_proto(drain_to_proto(status)) == status


def test_a_drain_is_suspended_when_a_failure_leaves_too_few_other_agents() -> None:
    cluster = cluster_of_five()
    cluster.drain("e")
    cluster.refresh_protection()
    for node in "abce":
        report(cluster, node, *HELD[node], now=2.0)
    assert cluster.tick(now=4.0).failed == ("d",)
    assert cluster.groups.draining == frozenset() and "drain of e suspended" in cluster.groups.reason
    cluster.refresh_protection()
    status = cluster.drain_status("e")
    assert status.draining and not status.drained
    assert "the drain is suspended: 3 other agents, a protection group needs 4 (k=2, m=1)" in status.reason
    assert cluster.announced_draining == frozenset(), "e holds fragments again meanwhile"
