"""`memckpt-coordinator`: config -> cluster state -> gRPC server over TCP; lease checks; main."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memckpt import config as config_mod
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.config import CoordinatorConfig
from memckpt.coordinator.service import CoordinatorServicer
from memckpt.coordinator.state import (
    STATE_SILENT_S,
    Frontend,
    expire_leases,
    quiet_collector,
    refresh_forever,
    start_metrics,
    tick_interval,
)
from memckpt.errors import ConfigError, Unavailable
from memckpt.process import run_daemon
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.security import HEALTH_METHOD_PREFIX, describe_security, server_credentials

log = logging.getLogger("memckpt.coordinator")
GRACE_S = 3.0
STOP_POLL_S = 0.5  # how often the daemon looks whether its state process is still there


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
    """An asyncio gRPC server: one event loop answers every agent, without a thread per call;
    the cluster's tables in a state process of their own (`state.py`), or in this one."""
    interceptors: list[grpc.aio.ServerInterceptor] = [AsyncTokenInterceptor(config.token)] if config.token else []
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    frontend: Frontend | None = None
    servicer: CoordinatorServicer | None = None
    if config.state_process:
        try:
            frontend = await Frontend.start(config)
        except Unavailable as exc:
            log.error("%s; see its log lines above", exc)
            return 1
        frontend.add_to(server)
    else:
        servicer = CoordinatorServicer(Cluster(k=config.k, m=config.m, lease_s=config.lease_s), config.heartbeat_interval_s)
        pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(config.tls)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        if frontend is not None:
            await frontend.close()
        raise ConfigError(f"cannot listen on {config.listen}")
    await server.start()
    quiet_collector()  # what start-up made lives as long as the process: never walk it again
    if config.port_file is not None:
        config.port_file.write_text(f"{port}\n")
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    serving = threading.Event()
    serving.set()
    metrics_server = start_metrics(config, servicer, serving) if servicer is not None else None
    log.info("%s", describe_security("coordinator", config.tls, config.token))
    log.info(
        "coordinator ready listen=%s port=%d k=%d m=%d lease_s=%.1f pid=%d state=%s",
        config.listen,
        port,
        config.k,
        config.m,
        config.lease_s,
        os.getpid(),
        f"process {frontend.process.pid}" if frontend is not None else "in this process",
    )
    code = 0
    if frontend is not None:
        code = await serve_until_stopped(frontend, stop)
    else:
        assert servicer is not None
        tick_s = tick_interval(config)
        leases = asyncio.create_task(expire_leases(servicer, tick_s))
        try:
            await refresh_forever(servicer, tick_s, stop)
        finally:
            leases.cancel()
    log.info("stopping")
    serving.clear()
    await server.stop(GRACE_S)
    if frontend is not None:
        await frontend.close()
    if metrics_server is not None:
        metrics_server.stop()
    return code


async def serve_until_stopped(frontend: Frontend, stop: threading.Event) -> int:
    """Until `stop` is set (0), or the state process is gone (1: the supervisor starts the
    coordinator again; its state is soft)."""
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, stop.wait, STOP_POLL_S):
        if frontend.silent_s() > STATE_SILENT_S and not frontend.ended.is_set():
            log.error(
                "the state process (pid %d) has said nothing for %.0f s: killed, and the coordinator stops; "
                "started again, it relearns the cluster from the agents",
                frontend.process.pid,
                frontend.silent_s(),
            )
            frontend.process.kill()
            return 1
        if frontend.ended.is_set():
            try:
                await loop.run_in_executor(None, frontend.process.wait, STOP_POLL_S * 10)
            except subprocess.TimeoutExpired:
                frontend.process.kill()
            log.error(
                "the state process (pid %d) ended (exit %s): the coordinator stops; started again, it relearns "
                "the cluster from the agents",
                frontend.process.pid,
                frontend.process.returncode,
            )
            return 1
    return 0


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
