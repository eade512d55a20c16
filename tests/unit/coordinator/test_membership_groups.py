from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from memckpt.coordinator.groups import build_groups, choose_fragment_holders
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
