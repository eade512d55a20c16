"""The HTTP endpoint every memckpt process serves for Prometheus and probes.

`GET /metrics`: the process's registry in the Prometheus text format. `GET /healthz`: 200
while the process serves, 503 otherwise (Kubernetes probes, load balancers). Names follow
Prometheus conventions: `memckpt_` prefix, base units (`_seconds`, `_bytes`), `_total` on
counters; labels are kept to bounded sets (`job`, `rank`, `source`, `state`), so a job's
label sets are dropped when it is released.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from memckpt.config import split_host_port
from memckpt.errors import ConfigError
from memckpt.security import TlsFiles

log = logging.getLogger(__name__)

# Seconds from a millisecond to minutes: stalls and commits are milliseconds, persists and
# rebuilds of large snapshots minutes.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(slots=True)
class MetricsServer:
    """A running endpoint; `address` is what it bound (port 0 resolved)."""

    address: str
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(listen: str, registry: CollectorRegistry, ready: Callable[[], bool], tls: TlsFiles | None = None) -> MetricsServer:
    """Serves `registry` and the health of `ready()` on `listen` (host:port, port 0: any free
    one) in a daemon thread. With `tls` certificate and key, over HTTPS (a CA makes clients
    present certificates it signed)."""
    host, port = split_host_port(listen, "metrics_listen")
    host = host.strip("[]")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                serving = ready()
                self._reply(200 if serving else 503, "text/plain; charset=utf-8", b"ok\n" if serving else b"not serving\n")
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            log.debug("metrics http: " + format, *args)

    server_class = _V6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None and tls.cert is not None and tls.key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            context.load_verify_locations(str(tls.ca))
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    bound = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    log.info("metrics on %s://%s/metrics (probes: /healthz)", scheme, address)
    return MetricsServer(address=address, _server=server, _thread=thread)


def serve_daemon(listen: str, registry: CollectorRegistry, ready: Callable[[], bool], tls: TlsFiles) -> MetricsServer:
    """`serve` for a daemon's `metrics_listen`: HTTPS with the daemon's own certificate when it
    has one, without asking clients for theirs (metrics hold no secrets, and Kubernetes probes
    cannot present a certificate); a port that cannot be bound is a ConfigError."""
    server_tls = TlsFiles(cert=tls.cert, key=tls.key) if tls.enabled else None
    try:
        return serve(listen, registry, ready=ready, tls=server_tls)
    except OSError as exc:
        raise ConfigError(f"cannot listen on metrics_listen {listen}: {exc}") from exc


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def forget_job(job: str, metrics: Iterable[MetricWrapperBase]) -> None:
    """Drops every label set of `job` from `metrics` (their first label must be `job`): a
    released job stops being exported instead of growing the label sets without bound."""
    for metric in metrics:
        for labels in list(metric._metrics):  # noqa: SLF001 (prometheus_client has no public iterator)
            if labels and labels[0] == job:
                metric.remove(*labels)
