from __future__ import annotations

from memckpt.coordinator.cluster import Held
from memckpt.coordinator.plan import RankHoldings, compute_recovery_plan, restorable_steps, source_of

LIVE = frozenset("abcde")


def copy(rank: int, step: int, generation: int = 1) -> Held:
    return Held(job="j", rank=rank, step=step, generation=generation)


def fragment(rank: int, step: int, index: int, generation: int = 1) -> Held:
    return Held(job="j", rank=rank, step=step, generation=generation, fragment_indices=(index,), k=2, m=1, size_bytes=100)


def spread(rank: int, step: int, nodes: str, generation: int = 1) -> dict[str, tuple[Held, ...]]:
    """Fragment i of the rank's step on the i-th of `nodes`."""
    return {node: (fragment(rank, step, i, generation),) for i, node in enumerate(nodes)}


def holdings(*parts: dict[str, tuple[Held, ...]]) -> RankHoldings:
    merged: dict[str, tuple[Held, ...]] = {}
    for part in parts:
        for node, entries in part.items():
            merged[node] = merged.get(node, ()) + entries
    return merged


def test_all_ranks_restore_the_newest_common_step() -> None:
    ranks = {
        0: holdings({"a": (copy(0, 7), copy(0, 6))}),
        1: holdings({"b": (copy(1, 6),)}, spread(1, 6, "cda")),
    }
    decision = compute_recovery_plan(ranks, 2, "abcd")
    assert decision.plan is not None and decision.plan.step == 6
    assert decision.plan.sources[0].copies == ("a",)
    assert decision.plan.sources[1].copies == ("b",)


def test_lost_node_is_rebuilt_from_fragments_on_live_peers() -> None:
    ranks = {
        0: holdings({"a": (copy(0, 5),)}, spread(0, 5, "bcd")),
        1: holdings({"b": (copy(1, 5),)}, spread(1, 5, "cda")),
    }
    decision = compute_recovery_plan(ranks, 2, "acd")  # node b died
    assert decision.plan is not None and decision.plan.step == 5
    source = decision.plan.sources[1]
    assert source.copies == () and source.fragments is not None
    assert source.fragments.holders == ((0, "c"), (1, "d"), (2, "a"))
    assert (source.fragments.k, source.fragments.m, source.fragments.size_bytes) == (2, 1, 100)
    lost_holder = decision.plan.sources[0].fragments
    assert lost_holder is not None and lost_holder.holders == ((1, "c"), (2, "d"))  # b's fragment 0 is gone


def test_beyond_tolerance_names_the_missing_ranks_and_restores_nothing() -> None:
    ranks = {
        0: holdings({"a": (copy(0, 5),)}),
        1: holdings({"b": (copy(1, 5),)}, spread(1, 5, "cda")),
    }
    decision = compute_recovery_plan(ranks, 2, "ae")  # b, c and d died: m+1 > m of b's fragment holders
    assert decision.plan is None and "ranks [1]" in decision.reason


def test_ranks_without_a_common_step_restore_nothing() -> None:
    ranks = {0: holdings({"a": (copy(0, 5),)}), 1: holdings({"b": (copy(1, 6),)})}
    decision = compute_recovery_plan(ranks, 2, "ab")
    assert decision.plan is None and "no step is held for every rank" in decision.reason


def test_fresh_job_has_no_plan() -> None:
    decision = compute_recovery_plan({}, 4, "a")
    assert decision.plan is None and "fresh start" in decision.reason


def test_fragments_of_two_commits_of_one_step_never_mix() -> None:
    """A step committed by generation 1 and again by generation 2: one fragment of each is not k of one."""
    rank = holdings({"a": (fragment(0, 5, 0, generation=1),), "b": (fragment(0, 5, 1, generation=2),)})
    assert restorable_steps(rank, LIVE) == set()
    rank = holdings(rank, {"c": (fragment(0, 5, 0, generation=2),)})
    assert restorable_steps(rank, LIVE) == {5}
    source = source_of(0, rank, 5, LIVE)
    assert source.fragments is not None and source.fragments.generation == 2
    assert source.fragments.holders == ((0, "c"), (1, "b"))


def test_the_newest_commit_of_a_step_is_chosen_when_both_suffice() -> None:
    rank = holdings(spread(0, 5, "ab", generation=1), spread(0, 5, "cd", generation=2))
    source = source_of(0, rank, 5, LIVE)
    assert source.fragments is not None and source.fragments.generation == 2
    assert {node for _, node in source.fragments.holders} == {"c", "d"}


def test_released_generations_are_never_restored() -> None:
    rank = holdings({"a": (copy(0, 5, generation=1), copy(0, 4, generation=2))}, spread(0, 6, "bc", generation=1))
    assert restorable_steps(rank, LIVE) == {4, 5, 6}
    assert restorable_steps(rank, LIVE, released=1) == {4}
    assert source_of(0, rank, 5, LIVE, released=1) == source_of(0, {}, 5, LIVE)
    decision = compute_recovery_plan({0: rank}, 1, LIVE, released=2)
    assert decision.plan is None and "fresh start" in decision.reason


def test_copies_on_dead_nodes_are_not_sources() -> None:
    rank = holdings({"a": (copy(0, 5),), "b": (copy(0, 5),), "c": (copy(0, 5),)})
    assert source_of(0, rank, 5, frozenset("ac")).copies == ("a", "c")
    assert restorable_steps(rank, frozenset("d")) == set()
