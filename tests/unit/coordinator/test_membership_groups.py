from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memckpt.coordinator.groups import build_groups, can_hold, choose_fragment_holders
from memckpt.coordinator.membership import AgentInfo, Membership


def agent(node: str, domain: str = "r0") -> AgentInfo:
    return AgentInfo(node=node, address=f"{node}:1", capacity_bytes=1 << 30, domain=domain)


def test_lease_expires_without_heartbeats_and_a_return_needs_a_new_registration() -> None:
    members = Membership(lease_s=3.0)
    first, change = members.register(agent("a"), now=0.0)
    assert change.joined == ("a",)
    assert members.heartbeat("a", first.incarnation, now=2.0)
    assert not members.expire(now=4.9).changed
    assert members.expire(now=5.1).failed == ("a",)
    assert not members.heartbeat("a", first.incarnation, now=5.2), "a failed agent must register again"
    second, change = members.register(agent("a"), now=6.0)
    assert second.incarnation > first.incarnation and change.joined == ("a",)
    assert not members.heartbeat("a", first.incarnation, now=6.5), "the old incarnation is fenced"


def test_too_few_agents_make_no_group_and_say_why() -> None:
    groups = build_groups([agent("a"), agent("b"), agent("c")], k=2, m=1)
    assert groups.groups == () and groups.unprotected == ("a", "b", "c") and "needs 4" in groups.reason


def test_groups_spread_failure_domains() -> None:
    agents = [agent(f"n{i}", f"rack{i % 4}") for i in range(8)]
    groups = build_groups(agents, k=2, m=1)
    assert len(groups.groups) == 2
    domains = {a.node: a.domain for a in agents}
    for group in groups.groups:
        assert len({domains[n] for n in group}) == len(group)


@given(st.integers(4, 40), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2))
def test_every_live_agent_is_in_exactly_one_big_enough_group(n: int, racks: int, k: int, m: int) -> None:
    agents = [agent(f"n{i:02d}", f"r{i % racks}") for i in range(n)]
    groups = build_groups(agents, k, m)
    placed = [node for g in groups.groups for node in g]
    if n >= k + m + 1:
        assert sorted(placed) == sorted(a.node for a in agents)
        assert all(len(g) >= k + m + 1 for g in groups.groups)
        if racks >= k + m + 1 and n % racks == 0:
            domains = {a.node: a.domain for a in agents}
            assert all(len({domains[x] for x in g}) == len(g) or len(g) > racks for g in groups.groups)
    else:
        assert placed == []


def test_fragment_holders_never_include_the_owner_and_rotate() -> None:
    group = ("a", "b", "c", "d")
    assert choose_fragment_holders("a", group, 3) == ("b", "c", "d")
    assert choose_fragment_holders("c", group, 3) == ("d", "a", "b")
    assert all("b" not in choose_fragment_holders("b", group, 3) for _ in range(2))


def test_a_draining_agent_owns_in_a_group_but_holds_no_ones_fragments() -> None:
    agents = [agent(f"n{i}", f"rack{i}") for i in range(5)]
    groups = build_groups(agents, k=2, m=1, draining=frozenset({"n1"}))
    assert groups.groups == (("n0", "n1", "n2", "n3", "n4"),) and groups.draining == {"n1"}
    assert "draining (owners only): n1" in groups.reason
    for owner in groups.groups[0]:
        holders = choose_fragment_holders(owner, groups.groups[0], 3, groups.draining)
        assert "n1" not in holders and owner not in holders and len(set(holders)) == 3


def test_draining_agents_join_one_group_each_and_every_group_keeps_enough_holders() -> None:
    agents = [agent(f"n{i}", f"rack{i % 4}") for i in range(10)]
    draining = frozenset({"n1", "n6"})
    groups = build_groups(agents, k=2, m=1, draining=draining)
    placed = [n for g in groups.groups for n in g]
    assert sorted(placed) == sorted(a.node for a in agents), "every live agent, draining or not, is in exactly one group"
    assert all(len([n for n in g if n not in draining]) >= 4 for g in groups.groups)
    assert groups.draining == draining


def test_a_drain_is_suspended_rather_than_leave_too_few_holders() -> None:
    agents = [agent(f"n{i}", f"rack{i}") for i in range(4)]
    groups = build_groups(agents, k=2, m=1, draining=frozenset({"n1"}))
    assert groups.groups == (("n0", "n1", "n2", "n3"),) and groups.draining == frozenset()
    assert "drain of n1 suspended: 3 other agents, a group needs 4" in groups.reason


def test_an_excluded_holder_is_replaced_and_every_other_keeps_its_index() -> None:
    group = ("a", "b", "c", "d", "e")
    assert choose_fragment_holders("c", group, 3) == ("d", "e", "a")
    assert choose_fragment_holders("c", group, 3, frozenset({"e"})) == ("d", "b", "a")
    assert choose_fragment_holders("c", group, 3, frozenset({"c"})) == ("d", "e", "a"), "a draining owner still owns"
    with pytest.raises(ValueError, match="cannot hold 3"):
        choose_fragment_holders("c", group, 3, frozenset({"a", "e"}))
    assert not can_hold("c", group, 3, frozenset({"a", "e"})) and can_hold("c", group, 3, frozenset({"e"}))


@given(st.integers(4, 12), st.integers(1, 3), st.integers(0, 2), st.data())
def test_holders_skip_the_owner_and_excluded_and_the_others_stay(n: int, k: int, m: int, data: st.DataObject) -> None:
    group = tuple(f"n{i:02d}" for i in range(n))
    owner = data.draw(st.sampled_from(group))
    exclude = frozenset(data.draw(st.lists(st.sampled_from(group), max_size=n)))
    count = k + m
    if not can_hold(owner, group, count, exclude):
        with pytest.raises(ValueError):
            choose_fragment_holders(owner, group, count, exclude)
        return
    before = choose_fragment_holders(owner, group, count)
    after = choose_fragment_holders(owner, group, count, exclude)
    assert len(set(after)) == count and owner not in after and not exclude & set(after)
    assert all(a == b for a, b in zip(after, before) if b not in exclude), "holders that stay keep their fragment index"


def test_a_drain_lasts_across_registrations_of_one_agent_process_and_ends_with_a_new_one() -> None:
    members = Membership(lease_s=3.0)
    members.register(agent("a"), now=0.0, instance=7)
    members.set_draining("a", True)
    assert members.draining_nodes() == {"a"}
    _, change = members.register(agent("a"), now=1.0, instance=7)  # a heartbeat was refused: same process
    assert members.draining_nodes() == {"a"} and not change.changed
    assert members.expire(now=10.0).failed == ("a",) and members.draining_nodes() == frozenset()
    _, change = members.register(agent("a"), now=11.0, instance=7)  # its partition healed: still the same process
    assert members.draining_nodes() == {"a"} and change.joined == ("a",) and change.undrained == ()
    _, change = members.register(agent("a"), now=12.0, instance=8)  # restarted after maintenance
    assert members.draining_nodes() == frozenset() and change.undrained == ("a",) and "drain is over" in change.reason
