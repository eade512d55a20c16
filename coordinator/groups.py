"""Protection groups: which agents hold each other's fragments. Pure logic.

A group has at least k+m+1 live members (an owner never holds its own fragments), and
its members come from different failure domains whenever the cluster has enough of them.
Groups are rebuilt from the live members when membership changes. A draining member (see
`memckpt drain`) owns ranks but holds nothing: groups are formed from the other agents, and
it joins one of them as an owner whose fragments the others hold.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from memckpt.coordinator.membership import AgentInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class Groups:
    groups: tuple[tuple[str, ...], ...]  # node names per group
    unprotected: tuple[str, ...]  # live nodes that no group can take (too few agents)
    reason: str
    draining: frozenset[str] = frozenset()  # owner-only members: never chosen as fragment holders
    index: dict[str, int] = field(init=False, repr=False, compare=False)  # node -> its group's position

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {node: i for i, group in enumerate(self.groups) for node in group})

    def group_of(self, node: str) -> tuple[str, ...] | None:
        i = self.index.get(node)
        return None if i is None else self.groups[i]

    def position_of(self, node: str) -> int:
        """The index of `node`'s group, or -1 when it has none."""
        return self.index.get(node, -1)


def build_groups(agents: list[AgentInfo], k: int, m: int, draining: frozenset[str] = frozenset()) -> Groups:
    """Partitions live agents into groups of k+m+1 or more, spreading failure domains.

    Agents are dealt round-robin over domains (largest first), then cut into groups, so
    consecutive members come from different domains; leftovers join the last group.
    `draining` agents are left out of that, then each joins the group where its domain is
    rarest, as an owner only; when the others are too few to form a group, the drain is
    suspended (they hold fragments as before) rather than leave ranks unprotected.
    """
    size = k + m + 1
    if len(agents) < size:
        names = tuple(sorted(a.node for a in agents))
        return Groups(groups=(), unprotected=names, reason=f"{len(agents)} live agents, a group needs {size} (k={k}, m={m})")
    holders = [a for a in agents if a.node not in draining]
    owners_only = sorted(a.node for a in agents if a.node in draining)
    suspended = ""
    if owners_only and len(holders) < size:
        suspended = f"; drain of {', '.join(owners_only)} suspended: {len(holders)} other agents, a group needs {size}"
        holders, owners_only = agents, []
    groups = _deal(holders, size)
    domain = {a.node: a.domain for a in agents}
    for node in owners_only:
        rarest = min(range(len(groups)), key=lambda i: (sum(domain[n] == domain[node] for n in groups[i]), len(groups[i]), i))
        groups[rarest].append(node)
    shared = sum(len(g) - len({domain[n] for n in g}) for g in groups)
    spread = "every group spans distinct domains" if not shared else f"{shared} member(s) share a domain within their group"
    drains = f"; draining (owners only): {', '.join(owners_only)}" if owners_only else suspended
    domains = len(set(domain.values()))
    return Groups(
        groups=tuple(tuple(sorted(g)) for g in groups),
        unprotected=(),
        reason=f"{len(groups)} group(s) of >= {size} from {len(agents)} agents in {domains} domains; {spread}{drains}",
        draining=frozenset(owners_only),
    )


def _deal(agents: list[AgentInfo], size: int) -> list[list[str]]:
    """Node names dealt round-robin over domains (largest first), cut into groups of `size` or more."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for agent in sorted(agents, key=lambda a: a.node):
        by_domain[agent.domain].append(agent.node)
    queues = sorted(by_domain.values(), key=lambda q: (-len(q), q[0]))
    order: list[str] = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    count = len(order) // size
    groups = [order[i * size : (i + 1) * size] for i in range(count)]
    groups[-1].extend(order[count * size :])
    return groups


def choose_fragment_holders(
    owner: str, group: tuple[str, ...], count: int, exclude: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """The `count` members after `owner` in its group (wrapping), never the owner itself.

    Rotating by the owner's position spreads every owner's fragments over different peers.
    An `exclude`d member (draining) in that window is replaced by the next members after it
    that are not excluded, so every other holder keeps its fragment index: moving a drained
    node's fragments moves nothing else.
    """
    if owner not in group:
        raise ValueError(f"group {group} does not have {owner}")
    start = group.index(owner)
    after = [group[(start + i) % len(group)] for i in range(1, len(group))]
    usable = [node for node in after if node not in exclude]
    if count > len(usable):
        raise ValueError(f"group {group} cannot hold {count} fragments of {owner} (excluded: {sorted(exclude)})")
    window = after[:count]
    spares = iter(node for node in usable if node not in window)
    return tuple(node if node not in exclude else next(spares) for node in window)


def can_hold(owner: str, group: tuple[str, ...], count: int, exclude: frozenset[str] = frozenset()) -> bool:
    """Whether `choose_fragment_holders` finds `count` holders for `owner` in `group`."""
    return owner in group and sum(1 for node in group if node != owner and node not in exclude) >= count
