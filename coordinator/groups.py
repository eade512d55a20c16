"""Protection groups: which agents hold each other's fragments. Pure logic.

A group has at least k+m+1 live members (an owner never holds its own fragments), and
its members come from different failure domains whenever the cluster has enough of them.
Groups are rebuilt from the live members when membership changes.
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
    index: dict[str, int] = field(init=False, repr=False, compare=False)  # node -> its group's position

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {node: i for i, group in enumerate(self.groups) for node in group})

    def group_of(self, node: str) -> tuple[str, ...] | None:
        i = self.index.get(node)
        return None if i is None else self.groups[i]

    def position_of(self, node: str) -> int:
        """The index of `node`'s group, or -1 when it has none."""
        return self.index.get(node, -1)


def build_groups(agents: list[AgentInfo], k: int, m: int) -> Groups:
    """Partitions live agents into groups of k+m+1 or more, spreading failure domains.

    Agents are dealt round-robin over domains (largest first), then cut into groups, so
    consecutive members come from different domains; leftovers join the last group.
    """
    size = k + m + 1
    if len(agents) < size:
        names = tuple(sorted(a.node for a in agents))
        return Groups(groups=(), unprotected=names, reason=f"{len(agents)} live agents, a group needs {size} (k={k}, m={m})")
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
    domain = {a.node: a.domain for a in agents}
    shared = sum(len(g) - len({domain[n] for n in g}) for g in groups)
    spread = "every group spans distinct domains" if not shared else f"{shared} member(s) share a domain within their group"
    return Groups(
        groups=tuple(tuple(sorted(g)) for g in groups),
        unprotected=(),
        reason=f"{len(groups)} group(s) of >= {size} from {len(agents)} agents in {len(by_domain)} domains; {spread}",
    )


def choose_fragment_holders(owner: str, group: tuple[str, ...], count: int) -> tuple[str, ...]:
    """The `count` members after `owner` in its group (wrapping), never the owner itself.

    Rotating by the owner's position spreads every owner's fragments over different peers.
    """
    if owner not in group or count > len(group) - 1:
        raise ValueError(f"group {group} cannot hold {count} fragments of {owner}")
    start = group.index(owner)
    return tuple(group[(start + i) % len(group)] for i in range(1, count + 1))
