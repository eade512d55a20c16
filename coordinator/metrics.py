"""What the coordinator exports to Prometheus (see `memckpt.metrics` for the endpoint and names).

Events are counted where they happen; the cluster's state is read under the servicer's lock
when Prometheus scrapes (`ClusterView`), never on the heartbeat path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memckpt import __version__
from memckpt.metrics import SECONDS_BUCKETS

REGISTRY = CollectorRegistry(auto_describe=True)

HEARTBEATS = Counter("memckpt_heartbeats_total", "Agent heartbeats answered", registry=REGISTRY)
HEARTBEAT_SECONDS = Histogram(
    "memckpt_heartbeat_seconds",
    "Handling one heartbeat, as the coordinator measures it (its inventory applied in a cluster "
    "of up to 64 agents; filed later by a refresh in a larger one)",
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
REFRESH_SECONDS = Histogram(
    "memckpt_coordinator_refresh_seconds",
    "One refresh of what agents reported (inventories filed, protection targets recomputed), wall "
    "time: paced to a share of the coordinator's time, so in a large cluster it shows how stale "
    "the coordinator's view of the inventories can be",
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
AGENT_FAILURES = Counter("memckpt_agent_failures_total", "Agents declared failed (their lease ran out)", registry=REGISTRY)
AGENT_JOINS = Counter("memckpt_agent_joins_total", "Agents that joined (new, or back after a failure)", registry=REGISTRY)
GENERATIONS = Counter("memckpt_generations_total", "Job generations started (each job restart is one)", registry=REGISTRY)
PLANS = Counter(
    "memckpt_recovery_plans_total",
    "Recovery plans answered, by outcome: memory (every rank restorable) or lost (memory cannot restore the job)",
    ["outcome"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobView:
    job: str
    generation: int
    world_size: int
    committed: int  # the newest step every rank has committed (-1: some rank none)
    protected: int  # the newest step protected for every rank (-1: none)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterView:
    alive: int
    failed: int
    groups: int
    jobs: tuple[JobView, ...]


class StateCollector(Collector):
    """Gauges of the cluster's state, from `view()` at scrape time."""

    def __init__(self, view: Callable[[], ClusterView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        info = GaugeMetricFamily("memckpt_coordinator_info", "This coordinator's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        agents = GaugeMetricFamily("memckpt_agents", "Agents known, by state", labels=["state"])
        agents.add_metric(["alive"], view.alive)
        agents.add_metric(["failed"], view.failed)
        yield agents
        yield GaugeMetricFamily("memckpt_protection_groups", "Protection groups of the live agents", value=view.groups)
        families = {
            "generation": GaugeMetricFamily("memckpt_job_generation", "The job's current generation", labels=["job"]),
            "world_size": GaugeMetricFamily("memckpt_job_world_size", "Ranks of the job", labels=["job"]),
            "committed": GaugeMetricFamily(
                "memckpt_job_committed_step", "Newest step every rank of the job has committed (-1: none)", labels=["job"]
            ),
            "protected": GaugeMetricFamily(
                "memckpt_job_protected_step",
                "Newest step protected for every rank of the job: what memory restores after a node loss (-1: none)",
                labels=["job"],
            ),
            "lag": GaugeMetricFamily(
                "memckpt_job_protect_lag_steps",
                "Committed steps not yet protected for every rank (committed - protected)",
                labels=["job"],
            ),
        }
        for job in view.jobs:
            families["generation"].add_metric([job.job], job.generation)
            families["world_size"].add_metric([job.job], job.world_size)
            families["committed"].add_metric([job.job], job.committed)
            families["protected"].add_metric([job.job], job.protected)
            if job.committed >= 0:
                families["lag"].add_metric([job.job], job.committed - job.protected)
        yield from families.values()
