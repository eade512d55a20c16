"""Processes of a local memckpt cluster on one machine: coordinator, agents, torchrun trainers.

Used by `memckpt demo` and by the integration tests. Each agent gets its own socket and
shm prefix; `stop()` ends a process with TERM, a grace period, then KILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.errors import Unavailable
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import TlsFiles, token_metadata

GRACE_S = 10.0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Polls `predicate` until it holds; raises TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def is_serving(socket_path: Path, timeout_s: float = 1.0) -> bool:
    """Whether an agent answers the gRPC health check on `socket_path`."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class ChildProcess:
    """A daemon started in its own session; `kill` is a crash, `stop` a clean stop."""

    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        """TERM, a grace period, then KILL; returns the exit code."""
        return stop_process(self.process)


class AgentProcess(ChildProcess):
    """A `memckpt-agent` child process with its own socket and shm prefix."""

    def __init__(
        self,
        *,
        socket_path: Path,
        shm_prefix: str,
        memory_limit: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.socket_path = socket_path
        self.shm_prefix = shm_prefix
        self.memory_limit = memory_limit
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = env
        self.wrapper = list(wrapper)  # a command prefix that execs the agent, e.g. `ip netns exec NAME`
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> AgentProcess:
        command = [
            *self.wrapper,
            sys.executable,
            "-m",
            "memckpt.agent",
            "--socket",
            str(self.socket_path),
            "--shm-prefix",
            self.shm_prefix,
            "--memory-limit",
            self.memory_limit,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        wait_until(lambda: self._check_alive() and is_serving(self.socket_path), timeout_s, f"agent on {self.socket_path}")
        return self

    def _check_alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise Unavailable(f"agent exited with {self.process.returncode}; see {self.log_path}")
        return True


def stop_process(process: subprocess.Popen[bytes] | None, grace_s: float = GRACE_S) -> int | None:
    """Ends a child started in its own session, with everything it started."""
    if process is None:
        return None
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    _signal_group(process.pid, signal.SIGKILL)  # stragglers of the group, if any
    return process.returncode


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def torchrun_command(*, nproc: int, max_restarts: int, trainer_args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        "-m",
        "memckpt.trainer",
        *trainer_args,
    ]


def start_torchrun(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The trainer's JSON-lines events; a line still being written is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


class CoordinatorProcess(ChildProcess):
    """A `memckpt-coordinator` child on a free loopback port."""

    def __init__(self, *, workdir: Path, extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.port_file = workdir / "coordinator.port"
        self.log_path = workdir / "coordinator.log"
        self.extra_args = list(extra_args)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> CoordinatorProcess:
        """Starts on a free port, or on the same port again after a kill (agents know it)."""
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "memckpt.coordinator",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--port-file",
            str(self.port_file),
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise Unavailable(f"coordinator exited with {self.process.returncode}; see {self.log_path}")
            return self.port_file.exists() and bool(self.port_file.read_text().strip())

        wait_until(ready, timeout_s, "the coordinator's port")
        self.port = int(self.port_file.read_text())
        return self


class LocalCluster:
    """A coordinator and `nodes` agents on this machine, each agent standing for one node.

    Node i has its own socket `workdir/host{i}.sock`, shm prefix, peer port (loopback) and
    failure domain (`rack{i}`), so rank r of a trainer started with `socket_template` talks
    to host r's agent. `lose_node` does what a dead machine does (SIGKILL of its agent, its
    shared memory gone); `replace_node` starts a fresh agent with a new node name at that
    host's socket, as a replacement machine would be.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        nodes: int,
        memory_limit: str,
        shm_prefix: str,
        token: str,
        k: int = 2,
        m: int = 1,
        lease_s: float = 2.0,
        heartbeat_interval_s: float = 0.2,
        agent_args: Sequence[str] = (),
        coordinator_args: Sequence[str] = (),
    ) -> None:
        if nodes < k + m + 1:
            raise ValueError(f"{nodes} nodes cannot protect with k={k}, m={m}: an owner needs k+m={k + m} peers")
        self.workdir = workdir
        self.token = token
        self.memory_limit = memory_limit
        self.shm_base = shm_prefix.removesuffix(".")
        self.agent_args = list(agent_args)
        self.coordinator = CoordinatorProcess(
            workdir=workdir,
            extra_args=[
                *("--lease-s", str(lease_s), "--heartbeat-interval-s", str(heartbeat_interval_s)),
                *("--k", str(k), "--m", str(m), "--token", token),
                *coordinator_args,
            ],
        )
        self.hosts: list[AgentProcess | None] = [None] * nodes
        self.node_names: list[str] = [f"node{i}" for i in range(nodes)]
        self._next_node = nodes

    @property
    def socket_template(self) -> Path:
        return self.workdir / "host{rank}.sock"

    def socket_of(self, host: int) -> Path:
        return self.workdir / f"host{host}.sock"

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        self.coordinator.start(timeout_s)
        for host in range(len(self.hosts)):
            self._start_agent(host, timeout_s)
        wait_until(lambda: len(self.grouped_nodes()) == len(self.hosts), timeout_s, "every agent in a protection group")
        wait_until(self.coordinator_warm, timeout_s, "the coordinator to answer where snapshots are (one lease after start)")
        return self

    def coordinator_warm(self) -> bool:
        """Whether the coordinator answers LocateSnapshots yet (it refuses for a lease after its start)."""
        with grpc.insecure_channel(self.coordinator.address) as channel:
            stub = cpb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.LocateSnapshots(
                    cpb.LocateSnapshotsRequest(job="warm-up-probe", rank=0), metadata=token_metadata(self.token), timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    return False
                raise
            return True

    def lose_node(self, host: int) -> str:
        """SIGKILL of the host's agent and removal of its shared memory; returns the node's name."""
        agent = self.hosts[host]
        if agent is None:
            raise ValueError(f"host {host} has no agent")
        agent.kill()
        self.hosts[host] = None
        self._unlink_shm(self.node_names[host])
        return self.node_names[host]

    def replace_node(self, host: int, timeout_s: float = 60.0) -> str:
        """A fresh agent, under a new node name, at the lost host's socket; returns its name."""
        if self.hosts[host] is not None:
            raise ValueError(f"host {host} still has a live agent")
        self.node_names[host] = f"node{self._next_node}"
        self._next_node += 1
        self._start_agent(host, timeout_s)
        return self.node_names[host]

    def cluster_status(self) -> cpb.GetClusterStatusResponse:
        with grpc.insecure_channel(self.coordinator.address) as channel:
            stub = cpb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
            reply: cpb.GetClusterStatusResponse = stub.GetClusterStatus(
                cpb.GetClusterStatusRequest(), metadata=token_metadata(self.token), timeout=10
            )
            return reply

    def grouped_nodes(self) -> list[str]:
        """Live agents that are members of a protection group, as the coordinator sees them."""
        return sorted(a.agent.node for a in self.cluster_status().agents if a.alive and a.group >= 0)

    def stop(self) -> list[int | None]:
        """Stops every agent (their slots and fragments removed) and the coordinator; exit codes."""
        codes = [agent.stop() for agent in self.hosts if agent is not None]
        codes.append(self.coordinator.stop())
        for node in self.node_names:
            self._unlink_shm(node)
        return codes

    def _start_agent(self, host: int, timeout_s: float) -> None:
        node = self.node_names[host]
        agent = AgentProcess(
            socket_path=self.socket_of(host),
            shm_prefix=f"{self.shm_base}-{node}.",
            memory_limit=self.memory_limit,
            log_path=self.workdir / f"{node}.log",
            extra_args=[
                *("--on-exit", "remove", "--node", node, "--domain", f"rack{host}"),
                *("--coordinator", self.coordinator.address, "--token", self.token),
                *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"),
                *self.agent_args,
            ],
        )
        self.hosts[host] = agent
        agent.start(timeout_s)

    def _unlink_shm(self, node: str) -> None:
        prefix = f"{self.shm_base}-{node}"  # its slots ("prefix.") and its peers' fragments ("prefix-frag.")
        for path in DEFAULT_ROOT.iterdir():
            if path.name.startswith((f"{prefix}.", f"{prefix}-")):
                path.unlink(missing_ok=True)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str, timeout_s: float = 10.0) -> Samples:
    """One Prometheus scrape of a memckpt process's /metrics at `address` (host:port, plain
    HTTP): (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:  # noqa: S310 (loopback, ours)
        text = reply.read().decode()
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of `name` with exactly `labels`, None when absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def make_test_certificates(directory: Path) -> TlsFiles:
    """A private CA and one certificate it signed for 127.0.0.1 / localhost, usable by servers
    and by clients (mutual TLS), made with the openssl command line: for tests and benchmarks
    on one machine, never for a cluster."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, request, cert = directory / "node.key", directory / "node.csr", directory / "node.pem"
    extensions = directory / "node.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=memckpt test CA",
        "-keyout", str(ca_key), "-out", str(ca_cert),
    )  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(request))
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    for path in (ca_key, key):
        path.chmod(0o600)
    return TlsFiles(cert=cert, key=key, ca=ca_cert)
