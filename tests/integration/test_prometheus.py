"""The shipped Prometheus config, alerting rules and Grafana dashboard against a real Prometheus
(the Debian package, installed by .ci/setup-prometheus) scraping a real local cluster.

`promtool` checks the rules, the config and a scrape of each kind of memckpt process. Then a
coordinator, four agents (persisting to a directory) and a 2-rank trainer under torchrun are
scraped every second with deploy/prometheus/prometheus.yml (only its intervals shortened), while
faults happen: persists that fail, a rank killed with SIGKILL and restored, an agent that stalls
(SIGSTOP) until the coordinator declares it failed. Every PromQL expression of the
dashboard and of the rules must then parse and return data, every rule group must be healthy,
and the alerts these faults should trigger must have been pending or firing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memckpt.local import (
    LocalCluster,
    read_events,
    start_torchrun,
    stop_process,
    torchrun_command,
    wait_until,
)
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "memckpt-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "memckpt.json"
SETUP = REPO / ".ci" / "setup-prometheus"

JOB = "watched"
METRICS = ("--metrics-listen", "127.0.0.1:0")
RATE_WINDOW = "15s"  # what $__rate_interval stands for: 15 scrapes at the test's 1 s interval
# Grafana's variables, as a user would have them: the test's job and every node.
VARIABLES = {"__rate_interval": RATE_WINDOW, "__interval": "1s", "job": JOB, "node": ".+"}
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


# -- Prometheus and promtool ---------------------------------------------------------------


def ensure_prometheus() -> None:
    """prometheus and promtool on PATH: installed by .ci/setup-prometheus when root (a failure
    there fails the test); skipped otherwise."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return
    if os.geteuid() != 0:
        pytest.skip("prometheus/promtool are not installed and this is not root: run .ci/setup-prometheus as root")
    result = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f".ci/setup-prometheus failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert shutil.which("prometheus") and shutil.which("promtool"), result.stdout[-3000:]


def promtool(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed ({result.returncode}):\n{output}"
    return output


class Prometheus:
    """A Prometheus server of the test's own, on a free loopback port, with a private data directory."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.time()
        wait_until(self._ready, 60, "prometheus ready", interval_s=0.2)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:  # noqa: S310
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the reply's `data`, or an AssertionError with Prometheus' error."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:  # noqa: S310 (loopback, ours)
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        assert body.get("status") == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": labels, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: a {data['resultType']}, not a vector"
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: str = "2s") -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        return list(data["result"])

    def holds(self, expr: str) -> bool:
        return bool(self.query(expr))

    def stop(self) -> None:
        stop_process(self.process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P and P + 1 free, below the ephemeral range (so no outgoing connection
    takes it meanwhile): the trainer's ranks serve on P + LOCAL_RANK, as they would on 9500+."""
    for port in range(20000 + os.getpid() % 5000 * 2, 32000, 2):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
                return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports below 32000")


# -- what to evaluate ----------------------------------------------------------------------


def walk_exprs(node: Any) -> Iterator[str]:
    """Every "expr" string of a Grafana dashboard model: panels' targets and annotations."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from walk_exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_exprs(value)


def substitute(expr: str) -> str:
    """The dashboard's Grafana variables ($name, ${name}) replaced as Grafana would."""
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def measured_quantity(expr: str) -> str | None:
    """For `QUANTITY OP NUMBER` (OP a comparison at the top level, outside brackets and
    strings): QUANTITY, which must return data where the whole expression (an alert's
    condition) may rightly return none. None for other expressions."""
    depth, quote, i = 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := COMPARISON.match(expr, i)):
            rest = expr[match.end() :].strip()
            try:
                float(rest)
            except ValueError:
                return None
            return expr[:i].strip()
        i += 1
    return None


def dashboard() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


def rules_in_file() -> list[str]:
    """Names of the rules file's alerts and recording rules, in order."""
    return re.findall(r"^\s*- (?:alert|record):\s*(\S+)", RULES.read_text(), flags=re.MULTILINE)


# -- the cluster ---------------------------------------------------------------------------


def agent_metrics_address(socket_path: Path) -> str:
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        reply = pb_grpc.AgentServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)  # type: ignore[no-untyped-call]
    assert reply.metrics_address, f"the agent at {socket_path} serves no metrics"
    return str(reply.metrics_address)


def step_events(path: Path, rank: int, attempt: int) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["event"] == "step" and e["rank"] == rank and e["attempt"] == attempt]


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:  # noqa: S310 (loopback, ours)
        return str(reply.read().decode())


def write_config(directory: Path, targets: dict[str, list[str]]) -> Path:
    """deploy/prometheus/prometheus.yml and its rules, copied into `directory` with 1 s
    intervals, and the target files its jobs read."""
    directory.mkdir()
    text = CONFIG.read_text()
    for setting in ("scrape_interval", "evaluation_interval"):
        text, replaced = re.subn(rf"^(\s+{setting}:) 15s$", r"\1 1s", text, flags=re.MULTILINE)
        assert replaced == 1, f"{CONFIG}: no global `{setting}: 15s` to shorten"
    (directory / "prometheus.yml").write_text(text)
    shutil.copy(RULES, directory / RULES.name)
    (directory / "targets").mkdir()
    for name, addresses in targets.items():
        (directory / "targets" / name).write_text(json.dumps([{"targets": addresses}]))
    return directory / "prometheus.yml"


# -- the tests -----------------------------------------------------------------------------


def test_rules_config_and_dashboard_pass_the_checks() -> None:
    ensure_prometheus()
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    assert "SUCCESS" in promtool("check", "config", str(CONFIG))  # loads the rules too (warns: no target files here)

    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "label_values(" in variables["job"]["definition"] and variables["job"]["definition"].endswith(", job)")
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert len(panel.get("description", "")) > 40, f"{panel['title']}: say what it means and what to do"
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        if panel["type"] != "table":
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
    units = {p["fieldConfig"]["defaults"].get("unit") for p in panels}
    assert {"s", "bytes", "percent"} <= units, units
    for expr in walk_exprs(model):
        substitute(expr)  # every variable is one the test knows
    alerts = set(rules_in_file())
    assert {"MemckptJobUnprotected", "MemckptAgentMemoryHigh", "MemckptPersistFailing", "MemckptAgentDown"} <= alerts


@pytest.mark.timeout(420)
def test_prometheus_evaluates_every_dashboard_and_rule_expression_on_a_live_cluster(tmp_path: Path, shm_prefix: str) -> None:
    ensure_prometheus()
    persist = tmp_path / "persist"
    # Persisting steps 10 and 15 fails (their directories' attempt marker cannot be written):
    # failures counted, the MemckptPersistFailing condition met; later steps persist.
    for step in (10, 15):
        (persist / JOB / f"step-{step:012d}" / ".attempt").mkdir(parents=True)
    cluster = LocalCluster(
        workdir=tmp_path,
        nodes=4,
        memory_limit="256MiB",
        shm_prefix=shm_prefix,
        token=uuid.uuid4().hex,
        agent_args=(*METRICS, "--persist-root", str(persist), "--persist-every", "5"),
        coordinator_args=METRICS,
    )
    prometheus: Prometheus | None = None
    trainer: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        coordinator = cluster.cluster_status().metrics_address
        agents = [agent_metrics_address(cluster.socket_of(host)) for host in range(4)]
        port = free_port_pair()
        ranks = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        config = write_config(
            tmp_path / "prometheus",
            {
                "memckpt-agents.json": agents,
                "memckpt-coordinator.json": [coordinator],
                "memckpt-trainers.json": ranks,
            },
        )
        assert "SUCCESS" in promtool("check", "config", str(config))
        prometheus = server = Prometheus(config, tmp_path / "prometheus")

        events = tmp_path / "train.events"
        args = [
            *("--job", JOB, "--preset", "tiny", "--seed", "5", "--socket", str(cluster.socket_template)),
            *("--events", str(events), "--step-delay-s", "0.2", "--steps", "5000"),
        ]
        env = {**os.environ, "MEMCKPT_TRAINER_METRICS_LISTEN": f"127.0.0.1:{port}"}
        command = torchrun_command(nproc=2, max_restarts=1, trainer_args=args)
        trainer = start_torchrun(command, tmp_path / "train.log", env=env)
        wait_until(lambda: len(step_events(events, 1, 0)) >= 8, 120, "rank 1 at step 8")

        # A rank is killed: torchrun restarts both ranks, which restore from their agents.
        os.kill(step_events(events, 1, 0)[-1]["pid"], signal.SIGKILL)
        restarted = lambda: all(len(step_events(events, rank, 1)) >= 4 for rank in (0, 1))  # noqa: E731
        wait_until(restarted, 120, "both ranks restarted and 4 steps on")

        # An agent stalls (SIGSTOP): Prometheus sees it down, the coordinator's lease runs out
        # and declares it failed, and the ranks skip snapshots while their slots wait on it; it
        # comes back (SIGCONT) and joins again. After the restart, so that the skips are counted
        # by the trainer processes Prometheus scrapes at the end.
        stalled = cluster.hosts[2]
        assert stalled is not None
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            down = f'up{{job="memckpt-agent", instance="{agents[2]}"}} == 0'
            wait_until(lambda: server.holds(down), 30, "prometheus to see the stalled agent down", 0.2)
            wait_until(lambda: server.holds('ALERTS{alertname="MemckptAgentDown"}'), 30, "MemckptAgentDown pending", 0.2)
            failed = 'memckpt_agents{state="failed"} == 1'
            wait_until(lambda: server.holds(failed), 30, "the coordinator to declare the stalled agent failed", 0.2)
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        wait_until(lambda: server.holds('memckpt_agents{state="alive"} == 4'), 60, "the agent back", 0.2)
        done = len(step_events(events, 1, 1))
        wait_until(lambda: len(step_events(events, 1, 1)) >= done + 4, 60, "four more steps")

        # promtool lints a scrape of each kind of process (each with restores and failures counted)
        for address in (agents[0], coordinator, ranks[0]):
            promtool("check", "metrics", stdin=scrape_text(address))

        wait_until(lambda: all_targets_up(server, 7), 60, "every target up", 0.2)
        # a few scrapes of the restarted ranks' restore counters (created at 0 when each rank starts)
        scraped = f'count(count_over_time(memckpt_client_restores_total{{job="{JOB}", source="local"}}[1m]) >= 3) == 2'
        wait_until(lambda: server.holds(scraped), 60, "the restored ranks scraped a few times", 0.2)
        wait_for_every_metric(server)
        wait_until(lambda: rules_healthy(server), 30, "every rule evaluated", 0.2)
        check_every_expression(server, agents)
        check_restores_are_counted(server)
        # what the faults should have triggered, at least as pending
        for alert in ("MemckptAgentDown", "MemckptAgentFailed", "MemckptPersistFailing"):
            seen = server.query(f'max_over_time(ALERTS{{alertname="{alert}"}}[10m])')
            assert seen, f"{alert} was never pending nor firing"
    finally:
        stop_process(trainer)
        if prometheus is not None:
            prometheus.stop()
        cluster.stop()


def all_targets_up(prometheus: Prometheus, expected: int) -> bool:
    targets = prometheus.api("targets", state="active")["activeTargets"]
    assert len(targets) == expected, [t["scrapeUrl"] for t in targets]
    return all(t["health"] == "up" for t in targets)


def rules_healthy(prometheus: Prometheus) -> bool:
    """Every rule of the file loaded, in its groups, and evaluated without error."""
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"memckpt-recording", "memckpt-alerts"}, [g["name"] for g in groups]
    rules = [rule for group in groups for rule in group["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(rules_in_file())
    errors = [(r["name"], r["lastError"]) for r in rules if r.get("lastError")]
    assert not errors, errors
    return all(r["health"] == "ok" for r in rules)


def wait_for_every_metric(prometheus: Prometheus, timeout_s: float = 60) -> None:
    """Every memckpt metric the dashboard and the rules use, scraped a few times (rates need two
    samples in their window): the cluster shows everything before the expressions are judged."""
    rules = " ".join(rule["query"] for group in prometheus.api("rules")["groups"] for rule in group["rules"])
    names = set(re.findall(r"(?<![:\w])memckpt_\w+(?![:\w])", " ".join(walk_exprs(dashboard())) + " " + rules))
    missing = sorted(names)
    deadline = time.monotonic() + timeout_s
    while missing:
        missing = [name for name in missing if not prometheus.holds(f"count_over_time({name}[1m]) >= 3")]
        assert time.monotonic() < deadline, f"never scraped (3 times in a minute) in {timeout_s:.0f}s: {missing}"
        time.sleep(0.5)


def check_every_expression(prometheus: Prometheus, agents: list[str]) -> None:
    """Each expression of the dashboard and of the rules parses and returns data (an alert's
    measured quantity, where the condition itself rightly returns nothing), also over the time
    range for the dashboard's graphs; the dashboard's variables find the job and the nodes."""
    model = dashboard()
    empty: list[str] = []
    for raw in walk_exprs(model):
        expr = substitute(raw)
        prometheus.query(expr)  # parses
        quantity = measured_quantity(expr) or expr
        if not prometheus.query(quantity):
            empty.append(f"dashboard: {quantity}")
        if not prometheus.query_range(quantity, prometheus.started, time.time()):
            empty.append(f"dashboard (range): {quantity}")
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            quantity = rule["query"] if rule["type"] == "recording" else measured_quantity(rule["query"])
            assert quantity is not None, f"alert {rule['name']}: not QUANTITY OP NUMBER: {rule['query']}"
            prometheus.query(rule["query"])
            if not prometheus.query(quantity):
                empty.append(f"{rule['type']} rule {rule['name']}: {quantity}")
            if rule["type"] == "recording" and not prometheus.query(rule["name"]):
                empty.append(f"recorded series {rule['name']}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)

    nodes = {f"node{i}" for i in range(len(agents))}
    for variable in model["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        values = set(prometheus.api(f"label/{match[2]}/values", **{"match[]": match[1]}))
        wanted = {JOB} if variable["name"] == "job" else nodes
        assert wanted <= values, f"variable {variable['name']}: {values}"


def check_restores_are_counted(prometheus: Prometheus) -> None:
    """The Recoveries panel shows the two local restores after the kill. Each agent's restore
    counter exists at 0 from the rank's registration (agent/metrics.py job_seen), so increase()
    sees each restore, extrapolated to the window's edges: 1 to about 1.08 per restore with
    scrapes a second apart (more when a loaded machine delays some): never 0, never 2 for one."""
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == "Recoveries"]
    (agents_expr,) = [t["expr"] for t in panel["targets"] if "memckpt_restores_total" in t["expr"]]
    series = prometheus.query_range(f"sum({substitute(agents_expr)})", prometheus.started, time.time(), step="1s")
    assert series, "no restores in the Recoveries panel"
    most = max(float(value) for _, value in series[0]["values"])
    assert 2 <= most < 2.5, f"the Recoveries panel shows at most {most} restores at once, not the 2 local ones"
