"""Agents the coordinator knows, their leases, and which of them are alive. Pure logic.

An agent registers, then renews its lease with heartbeats; an agent whose lease ran out
is failed. A failed agent that comes back must register again, with a new incarnation,
so the coordinator never confuses it with the agent it declared dead. A member being drained
stays draining across its registrations until the drain is undone or its agent restarts (it
registers with another instance id). Time comes in as `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from memckpt.names import check_name


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentInfo:
    node: str
    address: str  # host:port of its peer service, on the network that carries fragments
    capacity_bytes: int
    domain: str  # failure domain (rack): no two members of a group share one if avoidable

    def __post_init__(self) -> None:
        check_name(self.node, "node")
        check_name(self.domain, "failure domain")


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    info: AgentInfo
    incarnation: int
    lease_deadline: float
    alive: bool = True
    instance: int = 0  # the agent process's random id (0: not told)
    draining: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """What a membership event changed, and why (the daemon logs `reason`)."""

    joined: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    undrained: tuple[str, ...] = ()  # draining members whose agent restarted: their drain is over
    reason: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.joined or self.failed or self.undrained)


@dataclass(slots=True, kw_only=True)
class Membership:
    lease_s: float
    members: dict[str, Member] = field(default_factory=dict)
    incarnations: int = 0
    # the live members, sorted by node, kept until a registration or a failure changes them
    _alive: tuple[AgentInfo, ...] | None = field(default=None, init=False, repr=False)
    _alive_nodes: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    _addresses: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _draining: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def register(self, info: AgentInfo, now: float, instance: int = 0) -> tuple[Member, Change]:
        """(Re)admits an agent with a fresh lease and a new incarnation; a drain of its node
        goes on if it is the same agent process (`instance`) as before."""
        self.incarnations += 1
        previous = self.members.get(info.node)
        draining = previous is not None and previous.draining and previous.instance == instance
        undrained = (info.node,) if previous is not None and previous.draining and not draining else ()
        member = Member(
            info=info, incarnation=self.incarnations, lease_deadline=now + self.lease_s, instance=instance, draining=draining
        )
        self.members[info.node] = member
        self._alive = None
        restarted = "; its agent restarted, so its drain is over" if undrained else ""
        if previous is not None and previous.alive and previous.info == info:
            reason = f"node {info.node} re-registered (incarnation {member.incarnation}){restarted}"
            return member, Change(undrained=undrained, reason=reason)
        reason = f"node {info.node} joined at {info.address} ({info.domain}){restarted}"
        return member, Change(joined=(info.node,), undrained=undrained, reason=reason)

    def set_draining(self, node: str, draining: bool) -> None:
        """Marks a known member as draining, or not (the caller checked it exists)."""
        self.members[node] = replace(self.members[node], draining=draining)
        self._alive = None

    def draining_nodes(self) -> frozenset[str]:
        """The live members being drained."""
        self._live()
        return self._draining

    def heartbeat(self, node: str, incarnation: int, now: float) -> bool:
        """Renews a live member's lease; False tells the agent to register again."""
        member = self.members.get(node)
        if member is None or not member.alive or member.incarnation != incarnation:
            return False
        self.members[node] = replace(member, lease_deadline=now + self.lease_s)
        return True

    def expire(self, now: float) -> Change:
        """Fails every member whose lease ran out."""
        failed = tuple(sorted(n for n, m in self.members.items() if m.alive and m.lease_deadline < now))
        for node in failed:
            self.members[node] = replace(self.members[node], alive=False)
        if failed:
            self._alive = None
        reason = f"lease of {len(failed)} node(s) ran out: {', '.join(failed)}" if failed else ""
        return Change(failed=failed, reason=reason)

    def alive(self) -> list[AgentInfo]:
        return list(self._live())

    def alive_nodes(self) -> frozenset[str]:
        self._live()
        return self._alive_nodes

    def addresses(self) -> dict[str, str]:
        """node -> peer address of every live member (shared: do not modify)."""
        self._live()
        return self._addresses

    def _live(self) -> tuple[AgentInfo, ...]:
        """The sorted live members, recomputed only after a registration or a failure, so that
        a heartbeat or a lookup never sorts the whole cluster."""
        if self._alive is None:
            self._alive = tuple(sorted((m.info for m in self.members.values() if m.alive), key=lambda i: i.node))
            self._alive_nodes = frozenset(i.node for i in self._alive)
            self._addresses = {i.node: i.address for i in self._alive}
            self._draining = frozenset(n for n, m in self.members.items() if m.alive and m.draining)
        return self._alive
