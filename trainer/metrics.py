"""What a trainer rank exports to Prometheus when asked (`Checkpointer(metrics_listen=...)` or
MEMCKPT_TRAINER_METRICS_LISTEN): what checkpointing costs the training loop, seen from the rank.

Each rank of a node serves on the given port plus its LOCAL_RANK, so ranks never collide.
"""

from __future__ import annotations

import logging
import os
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram

from memckpt.config import split_host_port
from memckpt.metrics import SECONDS_BUCKETS, MetricsServer, serve

log = logging.getLogger(__name__)

LISTEN_ENV = "MEMCKPT_TRAINER_METRICS_LISTEN"

REGISTRY = CollectorRegistry(auto_describe=True)

STALL_SECONDS = Histogram(
    "memckpt_snapshot_stall_seconds",
    "What one snapshot() call held the training loop (flatten, layout, begin; the copy overlaps training)",
    ["job", "rank"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
COPY_SECONDS = Histogram(
    "memckpt_snapshot_copy_seconds",
    "Copying one snapshot into its slot, in the background",
    ["job", "rank"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)
COMMITTED = Counter("memckpt_client_snapshots_total", "Snapshots this rank committed", ["job", "rank"], registry=REGISTRY)
FAILURES = Counter(
    "memckpt_client_snapshot_failures_total",
    "Snapshots that failed or were skipped, by kind (Unavailable: skipped, no slot free to write)",
    ["job", "rank", "kind"],
    registry=REGISTRY,
)
RESTORES = Counter(
    "memckpt_client_restores_total",
    "Restores of this rank, by where the state came from (local, fragments, filesystem)",
    ["job", "rank", "source"],
    registry=REGISTRY,
)
RESTORE_SECONDS = Histogram(
    "memckpt_client_restore_seconds",
    "One restore of this rank, end to end, by source",
    ["job", "rank", "source"],
    buckets=SECONDS_BUCKETS,
    registry=REGISTRY,
)


def rank_seen(job: str, rank: str) -> None:
    """Creates this rank's counters at 0, so that Prometheus sees their first event as an increase."""
    COMMITTED.labels(job, rank)
    FAILURES.labels(job, rank, "Unavailable")  # the common kind: a snapshot skipped
    for source in ("local", "fragments", "filesystem"):
        RESTORES.labels(job, rank, source)


_server: MetricsServer | None = None
_lock = threading.Lock()


def serve_for_rank(listen: str, local_rank: int) -> MetricsServer:
    """Serves this process's trainer metrics on `listen`'s port + `local_rank` (port 0: any
    free one), once per process; later calls return the same server."""
    global _server
    with _lock:
        if _server is None:
            host, port = split_host_port(listen, LISTEN_ENV)
            _server = serve(f"{host}:{port + local_rank if port else 0}", REGISTRY, ready=lambda: True)
        return _server


def listen_from_env() -> str:
    return os.environ.get(LISTEN_ENV, "")
