from __future__ import annotations

from memckpt.coordinator.plan import FragmentSet, RankInventory, WholeCopy, compute_recovery_plan


def frags(step: int, nodes: list[str]) -> FragmentSet:
    return FragmentSet(step=step, k=2, m=1, size_bytes=100, holders=tuple(enumerate(nodes)))


def test_all_ranks_restore_the_newest_common_step() -> None:
    inv = {
        0: RankInventory(copies=(WholeCopy(node="a", step=7), WholeCopy(node="a", step=6))),
        1: RankInventory(copies=(WholeCopy(node="b", step=6),), fragments=(frags(6, ["c", "d", "a"]),)),
    }
    decision = compute_recovery_plan(inv, 2, ["a", "b", "c", "d"])
    assert decision.plan is not None and decision.plan.step == 6
    assert decision.plan.sources[0].copies == ("a",)
    assert decision.plan.sources[1].copies == ("b",)


def test_lost_node_is_rebuilt_from_fragments_on_live_peers() -> None:
    inv = {
        0: RankInventory(copies=(WholeCopy(node="a", step=5),), fragments=(frags(5, ["b", "c", "d"]),)),
        1: RankInventory(copies=(WholeCopy(node="b", step=5),), fragments=(frags(5, ["c", "d", "a"]),)),
    }
    decision = compute_recovery_plan(inv, 2, ["a", "c", "d"])  # node b died
    assert decision.plan is not None and decision.plan.step == 5
    source = decision.plan.sources[1]
    assert source.copies == () and source.fragments is not None
    assert {n for _, n in source.fragments.holders} == {"c", "d", "a"}


def test_beyond_tolerance_names_the_missing_ranks_and_restores_nothing() -> None:
    inv = {
        0: RankInventory(copies=(WholeCopy(node="a", step=5),)),
        1: RankInventory(copies=(WholeCopy(node="b", step=5),), fragments=(frags(5, ["c", "d", "a"]),)),
    }
    decision = compute_recovery_plan(inv, 2, ["a", "e"])  # b, c and d died: m+1 > m of b's fragment holders
    assert decision.plan is None and "ranks [1]" in decision.reason


def test_fresh_job_has_no_plan() -> None:
    assert compute_recovery_plan({}, 4, ["a"]).plan is None
