"""`memckpt-coordinator`: config -> cluster state -> gRPC server over TCP; lease checks; main."""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memckpt import config as config_mod
from memckpt.coordinator import metrics
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.config import CoordinatorConfig
from memckpt.coordinator.service import STATE_WORK_SHARE, CoordinatorServicer
from memckpt.errors import ConfigError
from memckpt.metrics import MetricsServer, serve_daemon
from memckpt.process import run_daemon
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.security import HEALTH_METHOD_PREFIX, describe_security, server_credentials

log = logging.getLogger("memckpt.coordinator")
# The tables of thousands of agents are millions of long-lived objects: with Python's default
# thresholds the cyclic collector walks them several times a second and every call waits for
# it (bench/coordinator_scale.py, 2,000 agents: heartbeat p99 267 ms with the defaults, 114 ms
# with these). Little the coordinator allocates is cyclic; reference counting frees the rest.
GC_THRESHOLDS = (50_000, 20, 100)

GRACE_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # a flag added later must not change what an abbreviation meant
        prog="memckpt-coordinator",
        description=(
            "The memckpt coordinator: agent membership and leases, protection groups, job generations "
            "and recovery plans. Its state is soft: after a restart it rebuilds everything from the "
            "agents' re-registrations, and training never waits for it."
        ),
    )
    config_mod.add_flags(parser, CoordinatorConfig)
    return parser


def serve(config: CoordinatorConfig, stop: threading.Event) -> int:
    return asyncio.run(serve_async(config, stop))


async def serve_async(config: CoordinatorConfig, stop: threading.Event) -> int:
    """An asyncio gRPC server: one event loop answers every agent, without a thread per call."""
    cluster = Cluster(k=config.k, m=config.m, lease_s=config.lease_s)
    servicer = CoordinatorServicer(cluster, config.heartbeat_interval_s)
    interceptors: list[grpc.aio.ServerInterceptor] = [AsyncTokenInterceptor(config.token)] if config.token else []
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(config.tls)
    if credentials is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        raise ConfigError(f"cannot listen on {config.listen}")
    await server.start()
    gc.freeze()  # what start-up made lives as long as the process: never walk it again
    gc.set_threshold(*GC_THRESHOLDS)
    if config.port_file is not None:
        config.port_file.write_text(f"{port}\n")
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    serving = threading.Event()
    serving.set()
    metrics_server = start_metrics(config, servicer, serving)
    log.info("%s", describe_security("coordinator", config.tls, config.token))
    log.info(
        "coordinator ready listen=%s port=%d k=%d m=%d lease_s=%.1f pid=%d",
        config.listen,
        port,
        config.k,
        config.m,
        config.lease_s,
        os.getpid(),
    )
    tick_s = min(1.0, config.lease_s / 4, config.heartbeat_interval_s)  # leases, and protection targets
    leases = asyncio.create_task(expire_leases(servicer, tick_s))
    try:
        await refresh_forever(servicer, tick_s, stop)
    finally:
        leases.cancel()
    log.info("stopping")
    serving.clear()
    await server.stop(GRACE_S)
    if metrics_server is not None:
        metrics_server.stop()
    return 0


async def refresh_forever(servicer: CoordinatorServicer, tick_s: float, stop: threading.Event) -> None:
    """Refreshes what the agents reported every `tick_s` (at once after one that took longer)
    until `stop` is set; logs when refreshes fall behind the tick and when they catch up."""
    loop = asyncio.get_running_loop()
    began, behind = time.monotonic(), False
    while not await loop.run_in_executor(None, stop.wait, max(0.0, began + tick_s - time.monotonic())):
        began = time.monotonic()
        worked = await servicer.refresh_async()
        took = time.monotonic() - began
        metrics.REFRESH_SECONDS.observe(took)
        if (took > 2 * tick_s) != behind:  # logged when it starts and when it ends, not every time
            behind = not behind
            if behind:
                log.warning(
                    "inventories are filed every %.1f s (a refresh takes %.2f s of CPU, paced to at most %.0f%% of "
                    "the coordinator's time): protection targets and plans see reports up to that late",
                    took,
                    worked,
                    100 * STATE_WORK_SHARE,
                )
            else:
                log.info("inventories are filed every %.1f s again", tick_s)


async def expire_leases(servicer: CoordinatorServicer, every_s: float) -> None:
    """Fails agents whose lease ran out, every `every_s`, however long a refresh takes."""
    while True:
        await asyncio.sleep(every_s)
        try:
            servicer.expire_leases()
        except Exception:  # a bug here must not end failure detection for good
            log.exception("lease expiry failed; trying again in %.1f s", every_s)


def start_metrics(config: CoordinatorConfig, servicer: CoordinatorServicer, serving: threading.Event) -> MetricsServer | None:
    """The Prometheus endpoint (`metrics_listen`, see `memckpt.metrics.serve_daemon`), healthy
    while `serving` is set; None when off."""
    if not config.metrics_listen:
        return None
    metrics.REGISTRY.register(metrics.StateCollector(servicer.metrics_view))
    server = serve_daemon(config.metrics_listen, metrics.REGISTRY, ready=serving.is_set, tls=config.tls)
    servicer.metrics_address = server.address
    return server


class AsyncTokenInterceptor(grpc.aio.ServerInterceptor):
    """`memckpt.security.TokenInterceptor` for the asyncio server: calls without the shared
    token are refused (UNAUTHENTICATED); health checks pass."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if details.method.startswith(HEALTH_METHOD_PREFIX) or handler is None:
            return handler
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(presented).encode(), self._expected):
            return handler
        return _deny_handler(handler)


def _deny_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` (gRPC drives the call by it) that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer ...)")

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await deny(request, context)
        yield None  # never reached: abort raised

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }.get((handler.request_streaming, handler.response_streaming))
    behavior: Any = deny
    if make is None:
        behavior = deny_stream
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
    return make(behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(build_parser(), CoordinatorConfig, argv, serve)


if __name__ == "__main__":
    sys.exit(main())
