"""`memckpt-coordinator`: config -> cluster state -> gRPC server over TCP; lease checks; main."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memckpt import config as config_mod
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.config import CoordinatorConfig
from memckpt.coordinator.service import CoordinatorServicer
from memckpt.errors import ConfigError
from memckpt.process import run_daemon
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.security import TokenInterceptor, describe_security, server_credentials

log = logging.getLogger("memckpt.coordinator")

GRACE_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    cluster = Cluster(k=config.k, m=config.m, lease_s=config.lease_s)
    servicer = CoordinatorServicer(cluster, config.heartbeat_interval_s)
    interceptors: list[grpc.ServerInterceptor] = [TokenInterceptor(config.token)] if config.token else []
    executor = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc")
    server = grpc.server(executor, interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(config.tls)
    if credentials is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        raise ConfigError(f"cannot listen on {config.listen}")
    server.start()
    if config.port_file is not None:
        config.port_file.write_text(f"{port}\n")
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
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
    while not stop.wait(min(1.0, config.lease_s / 4)):
        servicer.tick()
    log.info("stopping")
    server.stop(GRACE_S).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_daemon(build_parser(), CoordinatorConfig, argv, serve)


if __name__ == "__main__":
    sys.exit(main())
