"""What the agent exports to Prometheus (see `memckpt.metrics` for the endpoint and names).

Events (commits, skips, bytes sent, encodes, persists, restores) are counted where they happen;
state (memory, slots, fragments, steps) is read from the store when Prometheus scrapes, so
the hot paths pay one counter increment and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memckpt import __version__
from memckpt.agent.slots import SlotState
from memckpt.metrics import SECONDS_BUCKETS, forget_job

if TYPE_CHECKING:
    from memckpt.agent.fragments import FragmentStore
    from memckpt.agent.persist import JobStatus
    from memckpt.agent.store import SlotStore

REGISTRY = CollectorRegistry(auto_describe=True)

SNAPSHOTS = Counter(
    "memckpt_snapshots_total",
    "Snapshots committed",
    ["job"],
    registry=REGISTRY,
)
SNAPSHOT_BYTES = Counter(
    "memckpt_snapshot_bytes_total",
    "Bytes of the snapshots committed",
    ["job"],
    registry=REGISTRY,
)
SKIPPED = Counter(
    "memckpt_snapshots_skipped_total",
    "Snapshots refused because both of the rank's slots were kept (protection or persistence still reading one)",
    ["job"],
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "memckpt_commit_seconds",
    "From a snapshot's begin to its commit at the agent: the rank's copy into the slot",
    ["job"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
FRAGMENT_SENT_BYTES = Counter(
    "memckpt_fragment_sent_bytes_total",
    "Fragment bytes sent to peers (acknowledged)",
    registry=REGISTRY,
)
FRAGMENT_RECEIVED_BYTES = Counter(
    "memckpt_fragment_received_bytes_total",
    "Fragment bytes received from peers and stored",
    registry=REGISTRY,
)
PROTECTIONS = Counter(
    "memckpt_protections_total",
    "Snapshots protected (every fragment acknowledged)",
    ["job"],
    registry=REGISTRY,
)
PROTECT_FAILURES = Counter(
    "memckpt_protect_failures_total",
    "Protection attempts that failed (a peer down, slow or refusing); retried",
    registry=REGISTRY,
)
PROTECTED_STEP = Gauge(
    "memckpt_protected_step",
    "Newest step of the rank whose fragments every holder acknowledged",
    ["job", "rank"],
    registry=REGISTRY,
)
ENCODE_SECONDS = Histogram(
    "memckpt_ec_encode_seconds",
    "Erasure-coding one snapshot into its fragments",
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
DECODE_SECONDS = Histogram(
    "memckpt_ec_decode_seconds",
    "Rebuilding one snapshot from k fragments (fetch excluded)",
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
PERSIST_SECONDS = Histogram(
    "memckpt_persist_seconds",
    "Writing one rank's snapshot to the filesystem",
    ["job"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
PERSIST_BYTES = Counter(
    "memckpt_persist_bytes_total",
    "Snapshot bytes written to the filesystem",
    ["job"],
    registry=REGISTRY,
)
PERSIST_FAILURES = Counter(
    "memckpt_persist_failures_total",
    "Rank writes or finalizations to the filesystem that failed",
    ["job"],
    registry=REGISTRY,
)
RESTORES = Counter(
    "memckpt_restores_total",
    "Restores this agent served, by where the state came from",
    ["job", "source"],
    registry=REGISTRY,
)
DIRECT_RESTORES = Counter(
    "memckpt_direct_restores_total",
    "Restores from fragments handed to the trainer, which fetched the bytes from their holders itself",
    ["job"],
    registry=REGISTRY,
)
RESTORE_SECONDS = Histogram(
    "memckpt_restore_seconds",
    "Preparing a restore at the agent (verifying, or rebuilding from peers), by source",
    ["source"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
RANK_DEATHS = Counter(
    "memckpt_rank_deaths_total",
    "Ranks whose connection ended without a clean close (crash, kill)",
    ["job"],
    registry=REGISTRY,
)

_PER_JOB = (
    SNAPSHOTS,
    DIRECT_RESTORES,
    SNAPSHOT_BYTES,
    SKIPPED,
    COMMIT_SECONDS,
    PROTECTIONS,
    PROTECTED_STEP,
    PERSIST_SECONDS,
    PERSIST_BYTES,
    PERSIST_FAILURES,
    RESTORES,
    RANK_DEATHS,
)


RESTORE_SOURCES = ("local", "fragments")


def job_seen(job: str) -> None:
    """Creates the job's counters at 0 when a rank of it registers, so that the first event
    shows as an increase (Prometheus' rate() and increase() cannot see a series born at 1)."""
    for counter in (SNAPSHOTS, SNAPSHOT_BYTES, SKIPPED, PROTECTIONS, PERSIST_BYTES, PERSIST_FAILURES, RANK_DEATHS):
        counter.labels(job)
    for source in RESTORE_SOURCES:
        RESTORES.labels(job, source)


def forget(job: str) -> None:
    """The job was released here: its label sets go."""
    forget_job(job, _PER_JOB)


class StateCollector(Collector):
    """Gauges read at scrape time from the store, the fragment store and the persister."""

    def __init__(
        self,
        *,
        node: str,
        domain: str,
        store: SlotStore,
        fragments: FragmentStore,
        persistence: Callable[[], dict[str, JobStatus]],
        pending_persists: Callable[[], int],
        sessions: Callable[[], int],
    ) -> None:
        self._node, self._domain = node, domain
        self._store = store
        self._fragments = fragments
        self._persistence = persistence
        self._pending_persists = pending_persists
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "memckpt_agent_info",
            "This agent: node, failure domain, version",
            labels=["node", "domain", "version"],
        )
        info.add_metric([self._node, self._domain, __version__], 1)
        yield info
        ranks, used, limit = self._store.snapshot_status()
        yield GaugeMetricFamily("memckpt_memory_used_bytes", "Memory the agent's slots and fragments take", value=used)
        yield GaugeMetricFamily("memckpt_memory_budget_bytes", "The agent's memory budget (--memory-limit)", value=limit)
        slots = GaugeMetricFamily("memckpt_slots", "Snapshot slots held, by state", labels=["state"])
        counts = {state: 0 for state in SlotState}
        committed = GaugeMetricFamily(
            "memckpt_committed_step",
            "Newest committed step of each rank held here",
            labels=["job", "rank"],
        )
        for r in ranks:
            for s in r.slots:
                counts[s.state] += 1
            latest = r.latest_committed()
            if latest is not None:
                committed.add_metric([r.key.job, str(r.key.rank)], latest.step)
        for state, count in counts.items():
            slots.add_metric([state.value], count)
        yield slots
        yield committed
        held = self._fragments.held()
        yield GaugeMetricFamily("memckpt_fragment_sets", "Complete fragment sets held for peers' ranks", value=len(held))
        yield GaugeMetricFamily(
            "memckpt_fragments", "Fragments held for peers' ranks", value=sum(len(h.fragment_indices) for h in held)
        )
        yield GaugeMetricFamily("memckpt_rank_sessions", "Trainer ranks connected to this agent now", value=self._sessions())
        persisted = GaugeMetricFamily(
            "memckpt_persisted_step", "Newest complete checkpoint of the job on the filesystem (-1: none)", labels=["job"]
        )
        for job, status in sorted(self._persistence().items()):
            persisted.add_metric([job], status.complete_step)
        yield persisted
        yield GaugeMetricFamily(
            "memckpt_persist_backlog",
            "Rank snapshots kept for the filesystem and not yet written",
            value=self._pending_persists(),
        )
