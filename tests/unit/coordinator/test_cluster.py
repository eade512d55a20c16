from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memckpt.coordinator.cluster import Cluster, Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.protection import JobProtection
from memckpt.errors import NotFound, StaleGeneration


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


def test_a_refresh_counts_only_live_holders_and_follows_changed_reports() -> None:
    cluster = cluster_of_four()
    assert cluster.refresh_protection()["j"].keep == 9, "every rank's step 9 has all k+m fragments"
    incarnation = cluster.membership.members["c"].incarnation
    cluster.heartbeat("c", incarnation, (frag("j", 0, 9, 1),), now=1.0)  # dropped its fragment of rank 1
    assert cluster.refresh_protection()["j"].keep == -1
    cluster.heartbeat("c", incarnation, (frag("j", 0, 9, 1), frag("j", 1, 9, 1)), now=1.5)
    assert cluster.refresh_protection()["j"].keep == 9
    for node in ("a", "b", "c"):
        cluster.heartbeat(node, cluster.membership.members[node].incarnation, cluster.held[node], now=3.0)
    assert cluster.tick(now=4.5).failed == ("d",)
    assert cluster.refresh_protection()["j"].keep == -1, "d's fragments went with it"


def test_a_refresh_in_steps_sees_what_changed_in_between_at_the_next_refresh() -> None:
    cluster = cluster_of_four()
    cluster.refresh_protection()
    incarnation = cluster.membership.members["c"].incarnation
    of_rank_0, of_rank_1 = cluster.held["c"]
    cluster.heartbeat("c", incarnation, (of_rank_0,), now=1.0)  # dropped its fragment of rank 1
    steps = cluster.refresh_protection_in_steps(ranks_per_step=1)
    assert next(steps) == 1, "only rank 1 changed"
    cluster.heartbeat("c", incarnation, (of_rank_0, of_rank_1), now=1.5)  # between two steps
    assert list(steps) == []
    assert cluster.protection["j"].keep == -1, "as the refresh found rank 1"
    assert cluster.refresh_protection()["j"].keep == 9


def test_a_generation_started_during_a_refresh_in_steps_waits_for_the_next_refresh() -> None:
    cluster = cluster_of_four()
    cluster.refresh_protection()
    cluster.heartbeat("a", cluster.membership.members["a"].incarnation, (own("j", 0, 10), frag("j", 1, 9, 0)), now=1.0)
    steps = cluster.refresh_protection_in_steps(ranks_per_step=1)
    next(steps)
    generation = cluster.start_generation("j", 2, previous=1)
    list(steps)
    assert cluster.protection["j"].generation == 1, "the old generation's word, not a mix of both"
    assert cluster.refresh_protection()["j"] == JobProtection(generation=generation, target=-1, keep=-1)


@settings(max_examples=60, deadline=None)
@given(reports=st.lists(st.tuples(st.sampled_from("abcd"), st.sets(st.integers(0, 11), max_size=6)), max_size=12))
def test_progress_kept_per_changed_rank_matches_a_cluster_built_from_scratch(reports: list[tuple[str, set[int]]]) -> None:
    """Entries: 0-3 whole copies of ranks 0-1 at steps 8-9, 4-11 fragments (rank, step, index)."""
    entries = [own("j", r, s) for r in (0, 1) for s in (8, 9)]
    entries += [frag("j", r, s, i) for r in (0, 1) for s in (8, 9) for i in (0, 1)]
    cluster = cluster_of_four()
    cluster.refresh_protection()
    final = dict(cluster.held)
    for node, chosen in reports:
        final[node] = tuple(entries[i] for i in sorted(chosen))
        cluster.heartbeat(node, cluster.membership.members[node].incarnation, final[node], now=1.0)
        steps = cluster.refresh_protection_in_steps(ranks_per_step=1)
        next(steps, None)  # a refresh cut short by the next report: finished by the next refresh
    fresh = Cluster(k=2, m=1, lease_s=3.0)
    for node, held in final.items():
        fresh.register_agent(info(node), held, now=0.0)
    ours, theirs = cluster.refresh_protection().get("j"), fresh.refresh_protection().get("j")
    assert (ours.keep if ours else -1) == (theirs.keep if theirs else -1)
    assert cluster.rank_steps("j") == fresh.rank_steps("j")


def test_an_inventory_filed_late_is_dropped_when_its_agent_registered_again_or_failed() -> None:
    """The coordinator answers a heartbeat at once and files its inventory at the next tick: a
    report made by an earlier incarnation, or by an agent that failed meanwhile, must not
    overwrite what the agent holds now."""
    cluster = cluster_of_four()
    old = cluster.membership.members["a"].incarnation
    assert cluster.renew("a", old, now=1.0)
    incarnation, _ = cluster.register_agent(info("a"), (own("j", 0, 12),), now=1.5)
    assert incarnation != old
    assert not cluster.file_inventory("a", old, (own("j", 0, 10),))
    assert cluster.held["a"] == (own("j", 0, 12),)
    assert cluster.file_inventory("a", incarnation, (own("j", 0, 13),), memory_used_bytes=7)
    assert cluster.held["a"] == (own("j", 0, 13),) and cluster.memory_used["a"] == 7
    assert cluster.tick(now=10.0).failed  # every lease ran out
    assert not cluster.file_inventory("a", incarnation, (own("j", 0, 14),))
    assert cluster.held["a"] == (own("j", 0, 13),)


def test_heartbeat_inventories_are_filed_at_once_in_a_small_cluster_and_at_the_tick_in_a_large_one() -> None:
    from memckpt.coordinator.service import FILE_INLINE_MAX_AGENTS, CoordinatorServicer
    from memckpt.coordinator.wire import held_to_proto
    from memckpt.protos import coordinator_pb2 as pb

    cluster = Cluster(k=2, m=1, lease_s=100.0)
    servicer = CoordinatorServicer(cluster, heartbeat_interval_s=1.0)

    def beat(node: str, step: int) -> None:
        request = pb.HeartbeatRequest(
            node=node, incarnation=cluster.membership.members[node].incarnation, held=held_to_proto((own("j", 0, step),))
        )
        assert servicer._heartbeat(request).accepted

    for i in range(4):
        cluster.register_agent(info(f"n{i}"), (), now=0.0)
    beat("n0", 7)
    assert cluster.held["n0"] == (own("j", 0, 7),)  # filed as it came
    for i in range(4, FILE_INLINE_MAX_AGENTS + 1):
        cluster.register_agent(info(f"n{i}"), (), now=0.0)
    beat("n0", 8)
    assert cluster.held["n0"] == (own("j", 0, 7),)  # answered, not filed yet
    servicer.tick()
    assert cluster.held["n0"] == (own("j", 0, 8),)


def test_a_job_slower_than_the_refreshes_protects_its_targets_without_giving_them_up(caplog: pytest.LogCaptureFixture) -> None:
    """Steps every 0.4 s, refreshes every 0.2 s, so half the refreshes see no new commit. Each
    owner protects the target once it holds it (its fragments reach the holders' next
    reports); no target may be given up as if the job stood still, and the kept step follows
    the job within a few steps."""
    caplog.set_level(logging.INFO, logger="memckpt.coordinator.cluster")
    cluster = Cluster(k=2, m=1, lease_s=3.0)
    owners = {0: "a", 1: "b"}
    holders = {0: ("b", "c", "d"), 1: ("a", "c", "d")}
    protected: dict[int, list[int]] = {0: [], 1: []}

    def inventory(node: str, step: int) -> tuple[Held, ...]:
        entries = []
        for rank, owner in owners.items():
            if node == owner:
                entries += [own("j", rank, s, protected=s in protected[rank]) for s in (step - 1, step) if s >= 1]
            if node in holders[rank]:
                entries += [frag("j", rank, s, holders[rank].index(node)) for s in protected[rank][-2:]]
        return tuple(entries)

    for node in "abcd":
        cluster.register_agent(info(node), (), now=0.0)
    kept = set()
    for tick in range(1, 61):
        now = 0.2 * tick
        step = int(now / 0.4 + 1e-9)
        for node in "abcd":
            assert cluster.heartbeat(node, cluster.membership.members[node].incarnation, inventory(node, step), now=now)
        decided = cluster.refresh_protection(now=now).get("j", JobProtection(generation=1))
        kept.add(decided.keep)
        for rank in owners:
            if decided.target in (step - 1, step) and decided.target not in protected[rank]:
                protected[rank].append(decided.target)
    assert "given up" not in caplog.text
    assert decided.keep >= step - 3, f"the kept step {decided.keep} lags the job's step {step}"
    assert len(kept) >= 10, f"kept steps {sorted(kept)}: protection went on all along"


def test_a_released_job_is_dropped_everywhere_and_never_restored_from() -> None:
    cluster = cluster_of_four()
    assert cluster.refresh_protection(now=1.0)["j"].keep == 9
    assert cluster.release_job("j") == (1, 4), "generation 1; a, b, c and d hold some of it"
    told = cluster.refresh_protection(now=1.2)["j"]
    assert told == JobProtection(generation=1, released=True), "agents drop generation 1 and older"
    with pytest.raises(NotFound, match="released already"):
        cluster.release_job("j")
    with pytest.raises(NotFound, match="not known"):
        cluster.release_job("other")
    # a restart of the job before every agent dropped it: nothing released is restored
    generation = cluster.start_generation("j", 2, previous=1)
    decision = cluster.recovery_plan("j", generation)
    assert decision.plan is None and "a fresh start" in decision.reason, "as after a release"
    assert cluster.locate("j", 0) == ([], "")
    for node in "abcd":  # the agents dropped it
        cluster.heartbeat(node, cluster.membership.members[node].incarnation, (), now=1.5)
    assert cluster.refresh_protection(now=1.6).get("j", JobProtection(generation=2)) == JobProtection(generation=2), (
        "the new generation is protected afresh, not released"
    )


def test_a_released_job_is_no_longer_told_once_no_live_agent_holds_it() -> None:
    cluster = cluster_of_four()
    cluster.release_job("j")
    for node in "abc":
        cluster.heartbeat(node, cluster.membership.members[node].incarnation, (), now=1.0)
    assert cluster.refresh_protection(now=1.1)["j"].released, "d still holds fragments of it"
    cluster.heartbeat("d", cluster.membership.members["d"].incarnation, (), now=1.2)
    assert "j" not in cluster.refresh_protection(now=1.3)
