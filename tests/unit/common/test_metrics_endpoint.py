"""The HTTP endpoint of every memckpt process: Prometheus text on /metrics, probes on /healthz,
over HTTPS when given a certificate; released jobs' label sets go."""

from __future__ import annotations

import http.client
import ssl
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memckpt.metrics import forget_job, serve
from memckpt.security import TlsFiles


def get(address: str, path: str, context: ssl.SSLContext | None = None) -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(host, int(port), timeout=10)
    else:
        connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.getheader("Content-Type") or "", reply.read().decode()
    finally:
        connection.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def test_metrics_and_health_are_served_on_a_free_port() -> None:
    registry = CollectorRegistry()
    commits = Counter("memckpt_test_commits_total", "commits", ["job"], registry=registry)
    commits.labels("a").inc(3)
    serving = threading.Event()
    server = serve("127.0.0.1:0", registry, ready=serving.is_set)
    try:
        assert not server.address.endswith(":0")
        status, content_type, body = get(server.address, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert samples(body)[("memckpt_test_commits_total", (("job", "a"),))] == 3.0
        assert get(server.address, "/healthz")[0] == 503, "not serving yet"
        serving.set()
        assert get(server.address, "/healthz")[:1] == (200,)
        status, _, body = get(server.address, "/nothing")
        assert status == 404 and "/metrics" in body
    finally:
        server.stop()


def test_a_busy_port_is_an_error() -> None:
    registry = CollectorRegistry()
    first = serve("127.0.0.1:0", registry, ready=lambda: True)
    try:
        with pytest.raises(OSError):
            serve(first.address, registry, ready=lambda: True)
    finally:
        first.stop()


def test_https_with_the_configured_certificate(tls_files: TlsFiles) -> None:
    registry = CollectorRegistry()
    Gauge("memckpt_test_value", "a value", registry=registry).set(7)
    server = serve("127.0.0.1:0", registry, ready=lambda: True, tls=TlsFiles(cert=tls_files.cert, key=tls_files.key))
    try:
        context = ssl.create_default_context(cafile=str(tls_files.ca))
        status, _, body = get(server.address, "/metrics", context)
        assert status == 200 and samples(body)[("memckpt_test_value", ())] == 7.0
        with pytest.raises((ssl.SSLError, http.client.RemoteDisconnected, ConnectionResetError)):
            get(server.address, "/metrics")  # plain HTTP to an HTTPS port gets nothing
    finally:
        server.stop()


def test_forget_job_drops_only_that_jobs_label_sets() -> None:
    registry = CollectorRegistry()
    steps = Gauge("memckpt_test_step", "step", ["job", "rank"], registry=registry)
    steps.labels("a", "0").set(1)
    steps.labels("a", "1").set(2)
    steps.labels("b", "0").set(3)
    forget_job("a", [steps])
    left = samples(generate_latest(registry).decode())
    assert left == {("memckpt_test_step", (("job", "b"), ("rank", "0"))): 3.0}
