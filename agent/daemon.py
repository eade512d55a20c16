"""`memckpt-agent`: config -> slot store -> gRPC server on a unix socket; signals; main."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import socket
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memckpt import config as config_mod
from memckpt.agent import metrics
from memckpt.agent.bulk import BulkServer
from memckpt.agent.config import AgentConfig
from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.fragments import FragmentStore, fragment_prefix
from memckpt.agent.pacing import PaceLimits, Throttle
from memckpt.agent.peer_service import SERVER_OPTIONS, PeerServicer, add_to_server
from memckpt.agent.peers import PeerClient
from memckpt.agent.recover import RemoteRestore
from memckpt.agent.replicate import Replicator
from memckpt.agent.service import MAX_SESSIONS, AgentServicer
from memckpt.agent.shm import ShmDir
from memckpt.agent.slots import MemoryBudget
from memckpt.agent.store import SlotStore
from memckpt.coordinator.membership import AgentInfo
from memckpt.errors import ConfigError
from memckpt.metrics import MetricsServer, serve_daemon
from memckpt.process import Shutdown, run_daemon
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.security import TokenInterceptor, describe_security, server_credentials, server_ssl_context
from memckpt.sizes import format_size

if TYPE_CHECKING:
    from memckpt.agent.persist import Persister  # imports torch: loaded only when persisting

log = logging.getLogger("memckpt.agent")

GRACE_S = 5.0  # what calls in flight get to end when the agent stops
# The whole stop: inside the 10 s that supervisors give after SIGTERM (systemd's TimeoutStopSec=15,
# Kubernetes' 30, the tests' harness 10), so the shared memory is unlinked, not left by a SIGKILL.
STOP_S = 8.0
SERVICE_NAME = "memckpt.v1.AgentService"
RPC_THREADS = MAX_SESSIONS + 32  # rank sessions hold one thread each while they train; the rest serve calls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # a flag added later must not change what an abbreviation meant
        prog="memckpt-agent",
        description=(
            "The memckpt node agent: holds the in-memory snapshots of this node's trainer ranks in "
            "shared memory, serves them over a unix socket, and keeps them across its own restarts. "
            "Run one per node, as the user of the training job."
        ),
    )
    config_mod.add_flags(parser, AgentConfig)
    return parser


def prepare_socket(path: Path) -> None:
    """Makes the socket's directory (0700) and removes a stale socket; refuses a live one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.parent.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(f"socket directory {path.parent} must belong to uid {os.getuid()} and not be writable by others")
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a dead agent
        return
    finally:
        probe.close()
    raise ConfigError(f"another agent is serving {path}; stop it or choose another --socket")


# glibc's allocator, as BASELINES.md measured for gRPC streams of MiB-sized messages: with its
# defaults each chunk of a fragment is a fresh mmap (or heap pages trimmed and faulted in again),
# and first touches of fresh memory cost more than the transfer. Chunks up to 32 MiB come from the
# heap, and freed heap is kept (up to 1 GiB at its top) for the next chunk. The agent's own bulk
# memory is shared memory, which this does not touch. An environment variable of the same name
# (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) set by the operator wins.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 << 20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
}


def tune_allocator() -> dict[str, int]:
    """Sets glibc's malloc thresholds for bulk streaming (see ALLOCATOR_TUNING); returns what it set.

    Nothing on a libc without `mallopt` (not glibc), or for a setting the environment already makes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = {}
    for name, (param, value) in ALLOCATOR_TUNING.items():
        if name not in os.environ and mallopt(param, value) == 1:
            applied[name] = value
    return applied


def serve(config: AgentConfig, stop: threading.Event) -> int:
    if tuned := tune_allocator():
        log.info("malloc tuned for streaming: %s", " ".join(f"{k}={v}" for k, v in tuned.items()))
    limit = config.memory_limit_bytes()
    budget = MemoryBudget(limit_bytes=limit)  # one budget: own slots and peers' fragments
    store = SlotStore(shm=ShmDir(config.shm_dir), prefix=config.shm_prefix, budget=budget)
    link: CoordinatorLink | None = None
    replicator: Replicator | None = None

    def group_nodes() -> tuple[str, ...]:
        return tuple(a.node for a in link.group) if link is not None else ()

    def kept_version(job: str) -> tuple[int, int] | None:
        return link.kept_version(job) if link is not None else None

    def draining() -> frozenset[str]:
        return link.draining if link is not None else frozenset()

    fragments = FragmentStore(
        shm=ShmDir(config.shm_dir),
        prefix=fragment_prefix(config.shm_prefix),
        budget=budget,
        node=config.node,
        group=group_nodes,
        kept_version=kept_version,
        draining=draining,
    )
    adopted = store.adopt()
    adopted_fragments = fragments.adopt()  # also when alone now: they still count, and a coordinator may come back
    store.start()
    prepare_socket(config.socket)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    servicer = AgentServicer(store, config.node, remote_wait_s=config.restore_wait_s, persist_root=config.persist_root)
    peer_server = bulk_server = None
    if config.coordinator:
        bulk_server = start_bulk_server(config, fragments)
        peer_server, peer_port = start_peer_server(config, fragments, bulk_server)
        address = config.advertised_address(peer_port)
        info = AgentInfo(node=config.node, address=address, capacity_bytes=limit, domain=config.domain)
        link = CoordinatorLink(
            address=config.coordinator,
            info=info,
            inventory=lambda: store.held() + fragments.held(),
            token=config.token,
            tls=config.tls,
            memory_used=store.memory_used_bytes,
        )
        store.protection_target = link.target  # a commit of the target step is kept until protected
        link.on_protection = fragments.prune  # the job's kept step moved on (or this node is drained): older sets go

        def drop_released(job: str, generation: int) -> None:  # each logs what it dropped
            servicer.drop_job(job, generation)
            fragments.drop_job(job, generation)

        def release_everywhere(job: str) -> tuple[int, int]:
            reply = link.release(job)
            fragments.drop_job(job, reply.generation)  # this node's at once; the others' with their next heartbeat
            return reply.generation, reply.nodes_holding

        link.on_release = drop_released
        servicer.release_everywhere = release_everywhere
        link.start()
        replicator = Replicator(
            store=store,
            link=link,
            peers=PeerClient(token=config.token, tls=config.tls, bulk=config.peer_bulk),
            node=config.node,
            put_min_rate_bytes_per_s=config.put_min_rate_bytes_per_s,
            throttle=protection_throttle(config),
        )
        replicator.start()
        fetcher = PeerClient(token=config.token, tls=config.tls, bulk=config.peer_bulk)
        servicer.remote = RemoteRestore(link=link, peers=fetcher, store=store)
        servicer.direct_restore = config.direct_restore
    persister = None
    if config.persist_root is not None:
        from memckpt.agent.persist import Persister, PersistPolicy, StepChooser  # torch: only when persisting

        policy = PersistPolicy(every_steps=config.persist_every, interval_s=config.persist_interval_s)
        persister = Persister(
            store=store,
            budget=budget,
            root=config.persist_root,
            rate=config.persist_rate,
            keep=config.persist_keep,
            keep_every=config.persist_keep_every,
            world_size=store.job_world_size,
            finalize_here=lambda job: store.holds(job, 0),
            chooser=StepChooser(policy),
        )
        store.persist_wanted = persister.wants
        persister.start()
        servicer.persistence = persister.status_copy
        if config.persist_on_failure:
            servicer.on_rank_died = persister.rank_died
        log.info(
            "persisting to %s every=%d steps interval=%.0fs rate=%s/s keep=%d",
            config.persist_root,
            config.persist_every,
            config.persist_interval_s,
            format_size(config.persist_rate) if config.persist_rate else "unlimited",
            config.persist_keep,
        )
    serving = threading.Event()
    metrics_server = start_metrics(config, store, fragments, servicer, persister, serving)
    # Ranks are served only now that the servicer is whole: a rank asking a replacement agent
    # before its link to the coordinator existed would have heard "nothing held" and started fresh.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"), options=options)
    pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"unix:{config.socket}")
    server.start()
    os.chmod(config.socket, 0o600)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    serving.set()
    log.info(
        "agent ready node=%s socket=%s budget=%s adopted_ranks=%d adopted_fragments=%d pid=%d",
        config.node,
        config.socket,
        format_size(limit),
        adopted,
        adopted_fragments,
        os.getpid(),
    )
    stop.wait()
    log.info("stopping: within %.0fs (calls in flight get %.0fs) on_exit=%s", STOP_S, GRACE_S, config.on_exit)
    serving.clear()
    health_servicer.enter_graceful_shutdown()
    servicer.sessions.stopping = True  # ranks' streams cut by this stop are not their deaths
    shutdown = Shutdown(log, STOP_S, time.monotonic)
    # What sends to peers stops first: no new fragment goes out while the peers (and we) drain.
    if replicator is not None:
        shutdown.stage("protection", replicator.stop)

    def drain_servers(timeout_s: float) -> None:
        grace = min(GRACE_S, timeout_s)
        drained = [s.stop(grace) for s in (peer_server, server) if s is not None]  # both drain at once
        if bulk_server is not None:
            bulk_server.stop(grace)
        for event in drained:
            event.wait(timeout_s)

    shutdown.stage("serving", drain_servers)
    if persister is not None:
        shutdown.stage("persisting", persister.stop)
    if link is not None:
        shutdown.stage("coordinator link", link.stop)
    if metrics_server is not None:
        shutdown.stage("metrics", lambda _: metrics_server.stop())
    # Last, and always reached in time: the fragments and slots, unlinked with --on-exit=remove.
    shutdown.stage("fragments", lambda _: fragments.stop(remove=config.on_exit == "remove"))
    shutdown.stage("slots", lambda timeout_s: store.stop(remove=config.on_exit == "remove", timeout_s=timeout_s))
    config.socket.unlink(missing_ok=True)
    log.info("agent stopped%s", f" (failed to stop: {', '.join(shutdown.failed)})" if shutdown.failed else "")
    return 1 if shutdown.failed else 0


def protection_throttle(config: AgentConfig) -> Throttle | None:
    """The pace protection keeps to (`protect_rate`, `protect_cpu`), on this process's clocks; None: no limit."""
    limits = PaceLimits(rate_bytes_per_s=config.protect_rate, cpu_cores=config.protect_cpu)
    if not limits.is_limited:
        return None
    rate = f"{format_size(config.protect_rate)}/s" if config.protect_rate else "unlimited"
    log.info("protection paced: rate=%s cpu=%s", rate, f"{config.protect_cpu:g} cores" if config.protect_cpu else "unlimited")
    return Throttle(limits, clock=time.monotonic, cpu_clock=time.process_time)


def start_metrics(
    config: AgentConfig,
    store: SlotStore,
    fragments: FragmentStore,
    servicer: AgentServicer,
    persister: Persister | None,
    serving: threading.Event,
) -> MetricsServer | None:
    """The Prometheus endpoint (`metrics_listen`, see `memckpt.metrics.serve_daemon`), healthy
    while `serving` is set; None when off."""
    if not config.metrics_listen:
        return None
    metrics.REGISTRY.register(
        metrics.StateCollector(
            node=config.node,
            domain=config.domain,
            store=store,
            fragments=fragments,
            persistence=servicer.persistence,
            pending_persists=store.persist_backlog if persister is not None else lambda: 0,
            sessions=servicer.sessions.count,
        )
    )
    server = serve_daemon(config.metrics_listen, metrics.REGISTRY, ready=serving.is_set, tls=config.tls)
    servicer.metrics_address = server.address
    return server


def start_bulk_server(config: AgentConfig, fragments: FragmentStore) -> BulkServer | None:
    """The bulk channel for fragment bytes (agent/bulk.py) on peer_listen's host, with the
    peer service's TLS; None when `peer_bulk` is off."""
    if not config.peer_bulk:
        log.info("bulk channel off (peer_bulk): fragments travel in gRPC streams")
        return None
    host, _ = config_mod.split_host_port(config.peer_listen, "peer_listen")
    try:
        server = BulkServer(fragments, host, config.peer_bulk_port, tls=server_ssl_context(config.tls))
    except OSError as exc:
        where = f"{host}:{config.peer_bulk_port}"
        raise ConfigError(f"cannot listen on {where} for the bulk channel (peer_bulk_port): {exc}") from exc
    log.info("bulk channel listening on %s port=%d (%s)", host, server.port, "TLS" if config.tls.enabled else "plain TCP")
    return server


def start_peer_server(config: AgentConfig, fragments: FragmentStore, bulk: BulkServer | None = None) -> tuple[grpc.Server, int]:
    """The peer service on TCP (`peer_listen`), with TLS and the token when configured; returns it and its port."""
    interceptors: list[grpc.ServerInterceptor] = [TokenInterceptor(config.token)] if config.token else []
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),  # fragment chunks are up to 4 MiB
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        *SERVER_OPTIONS,  # keepalive: accepts peers' pings, pings them
    ]
    executor = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="peer")
    server = grpc.server(executor, interceptors=interceptors, options=options)
    add_to_server(PeerServicer(fragments, bulk), server)
    credentials = server_credentials(config.tls)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.peer_listen)
        else:
            port = server.add_secure_port(config.peer_listen, credentials)
    except RuntimeError as exc:  # grpc raises this when the address cannot be bound
        raise ConfigError(f"cannot listen on peer_listen {config.peer_listen}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on peer_listen {config.peer_listen}")
    server.start()
    log.info("%s", describe_security("peer service", config.tls, config.token))
    log.info("peer service listening on %s port=%d", config.peer_listen, port)
    return server, port


def main(argv: list[str] | None = None) -> int:
    return run_daemon(build_parser(), AgentConfig, argv, serve, umask=0o077)  # all it creates is the user's


if __name__ == "__main__":
    sys.exit(main())
