from __future__ import annotations

import pytest

from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.errors import StaleGeneration


def info(node: str) -> AgentInfo:
    return AgentInfo(node=node, address=f"{node}:7000", capacity_bytes=1 << 30, domain=f"rack-{node}")


def own(job: str, rank: int, step: int, generation: int = 1, protected: bool = True) -> Held:
    return Held(job=job, rank=rank, step=step, generation=generation, protected=protected)


def frag(job: str, rank: int, step: int, index: int, generation: int = 1) -> Held:
    return Held(job=job, rank=rank, step=step, generation=generation, fragment_indices=(index,), k=2, m=1, size_bytes=64)


def cluster_of_four() -> Cluster:
    cluster = Cluster(k=2, m=1, lease_s=3.0)
    held = {
        "a": (own("j", 0, 9), frag("j", 1, 9, 0)),
        "b": (own("j", 1, 9), frag("j", 0, 9, 0)),
        "c": (frag("j", 0, 9, 1), frag("j", 1, 9, 1)),
        "d": (frag("j", 0, 9, 2), frag("j", 1, 9, 2)),
    }
    for node, entries in held.items():
        cluster.register_agent(info(node), entries, now=0.0)
    return cluster


def test_node_loss_is_detected_and_the_plan_uses_fragments() -> None:
    cluster = cluster_of_four()
    assert len(cluster.groups.groups) == 1
    for node in ("a", "c", "d"):
        assert cluster.heartbeat(node, cluster.membership.members[node].incarnation, cluster.held[node], now=2.5)
    assert cluster.tick(now=3.5).failed == ("b",)
    generation = cluster.start_generation("j", 2, previous=1)
    decision = cluster.recovery_plan("j", generation)
    assert decision.plan is not None and decision.plan.step == 9
    assert decision.plan.sources[1].copies == () and decision.plan.sources[1].fragments is not None


def test_plan_is_pinned_for_the_generation() -> None:
    cluster = cluster_of_four()
    generation = cluster.start_generation("j", 2, previous=1)
    first = cluster.recovery_plan("j", generation)
    cluster.heartbeat("a", cluster.membership.members["a"].incarnation, (own("j", 0, 10),), now=1.0)
    assert cluster.recovery_plan("j", generation) is first


def test_older_generations_are_fenced() -> None:
    cluster = cluster_of_four()
    generation = cluster.start_generation("j", 2, previous=1)
    with pytest.raises(StaleGeneration):
        cluster.check_generation("j", generation - 1)
    with pytest.raises(StaleGeneration):
        cluster.recovery_plan("j", generation - 1)


def test_restarted_coordinator_rebuilds_jobs_from_agents() -> None:
    cluster = cluster_of_four()  # a fresh Cluster fed only by registrations, as after a restart
    assert cluster.jobs["j"].generation == 1 and cluster.jobs["j"].world_size == 2
    assert cluster.rank_steps("j")[0].committed == 9 and cluster.rank_steps("j")[1].protected == 9


def test_fragments_of_one_step_from_two_attempts_never_mix() -> None:
    cluster = Cluster(k=2, m=1, lease_s=3.0)
    held = {  # step 9 of rank 0 committed by generation 1, then again by generation 2
        "a": (frag("j", 0, 9, 0, generation=1),),
        "b": (frag("j", 0, 9, 1, generation=2),),
        "c": (frag("j", 0, 9, 2, generation=1),),
        "d": (frag("j", 0, 9, 0, generation=2),),
    }
    for node, entries in held.items():
        cluster.register_agent(info(node), entries, now=0.0)
    found, lost = cluster.locate("j", 0)
    ((step, source),) = found
    assert step == 9 and lost == "" and source.fragments is not None
    assert source.fragments.generation == 2, "the newest attempt's commit of the step"
    assert dict(source.fragments.holders) == {0: "d", 1: "b"}, "only fragments of that attempt"
