"""What the protection benchmarks share: a real coordinator and agents on loopback, and the raw
TCP socket that fragment streaming is compared against.

A `LocalGroup` starts a coordinator and agents (each with its own socket, shm prefix, peer port
and failure domain) the way the integration tests do, and stops them, removing their shared
memory, however the block ends. `raw_socket_gbps` streams bytes from a child process with
`sendall` into a preallocated, touched buffer with `recv_into`: no framing, no checksums, no
copies beyond the kernel's; the floor that any peer transfer on this machine pays.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from memckpt.agent.shm import ShmDir
from memckpt.local import AgentProcess, CoordinatorProcess, wait_until
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata

TOKEN = "bench-token"
LOG_TAIL_BYTES = 4000
SHM_PREFIX_ROOT = "memckpt-bench-"  # every agent a bench starts gets a unique prefix below this
RECV_CHUNK_BYTES = 4 << 20


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def log_tail(path: Path) -> str:
    if not path.exists():
        return ""
    return path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")


@dataclass
class LocalGroup:
    """A coordinator and agents node0..node{n-1}, one protection group of k + m."""

    workdir: Path
    coordinator: CoordinatorProcess
    memory_limit: str
    prefix: str  # every agent's shm prefix starts with it
    tls: TlsFiles = field(default_factory=TlsFiles)  # mutual TLS everywhere when enabled
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def start_agent(self, node: str, extra_args: tuple[str, ...] = ()) -> AgentProcess:
        index = int(node.removeprefix("node"))
        args = (
            *("--node", node, "--coordinator", self.coordinator.address, "--token", TOKEN, "--domain", f"rack{index}"),
            *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--on-exit", "remove"),
            *tls_flags(self.tls),
            *extra_args,
        )
        agent = AgentProcess(
            socket_path=self.workdir / f"{node}.sock",
            shm_prefix=f"{self.prefix}{node}.",
            memory_limit=self.memory_limit,
            log_path=self.workdir / f"{node}.log",
            extra_args=args,
        )
        self.agents[node] = agent
        try:
            agent.start()
        except BaseException:
            progress(f"{node} log tail:\n{log_tail(agent.log_path)}")
            raise
        return agent

    def status(self) -> cpb.GetClusterStatusResponse:
        credentials = channel_credentials(self.tls)
        channel = (
            grpc.secure_channel(self.coordinator.address, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.coordinator.address)
        )
        with channel:
            return cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
                cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
            )

    def addresses(self) -> dict[str, str]:
        """node -> peer address of the live agents in a group, as the coordinator tells them."""
        return {a.agent.node: a.agent.address for a in self.status().agents if a.alive and a.group >= 0}

    def protected_step(self, job: str, rank: int) -> int:
        for job_status in self.status().jobs:
            for r in job_status.ranks:
                if job_status.job == job and r.rank == rank:
                    return int(r.protected_step)
        return -1

    def lose(self, node: str) -> None:
        """The whole node goes: SIGKILL its agent, then its shared memory."""
        agent = self.agents.pop(node)
        agent.kill()
        remove_segments(agent.shm_prefix)


def remove_segments(prefix: str) -> list[str]:
    shm = ShmDir()
    left = shm.list_names(prefix)
    for name in left:
        shm.unlink(name)
    return left


def tls_flags(tls: TlsFiles) -> tuple[str, ...]:
    if not tls.enabled:
        return ()
    return ("--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca))


@contextlib.contextmanager
def local_group(nodes: int, k: int, m: int, memory_limit_bytes: int, tls: TlsFiles | None = None) -> Iterator[LocalGroup]:
    """A coordinator (placing k + m fragments) and `nodes` agents, all in one group once this
    yields; with `tls`, every connection is mutual TLS with it."""
    workdir = Path(tempfile.mkdtemp(prefix="memckpt-bench-"))
    tls = tls or TlsFiles()
    coordinator = CoordinatorProcess(
        workdir=workdir,
        extra_args=[
            *("--lease-s", "2", "--heartbeat-interval-s", "0.2", "--k", str(k), "--m", str(m), "--token", TOKEN),
            *tls_flags(tls),
        ],
    )
    group = LocalGroup(
        workdir=workdir,
        coordinator=coordinator,
        memory_limit=str(memory_limit_bytes),
        prefix=f"{SHM_PREFIX_ROOT}{uuid.uuid4().hex[:6]}-",
        tls=tls,
    )
    try:
        coordinator.start()
        for i in range(nodes):
            group.start_agent(f"node{i}")
        names = sorted(group.agents)
        wait_until(lambda: sorted(group.addresses()) == names, 60, "every agent in a protection group", interval_s=0.1)
        progress(f"coordinator {coordinator.address}, agents {names}, shm prefix {group.prefix}")
        yield group
    finally:
        for node, agent in group.agents.items():
            code = agent.stop()
            if code not in (0, None):
                progress(f"warning: {node} exited with {code}:\n{log_tail(agent.log_path)}")
        coordinator.stop()
        if left := remove_segments(group.prefix):
            progress(f"warning: agents left shm segments {left}; removed them")
        shutil.rmtree(workdir, ignore_errors=True)


# -- the raw socket floor ---------------------------------------------------------------

# The sender: a child process, as a peer agent is; it sends `size` bytes `count` times from a
# touched buffer, one connection per transfer.
_SENDER = """
import socket, sys
port, size, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = bytearray(size)
data[:] = bytes(range(256)) * (size // 256) + bytes(size % 256)
view = memoryview(data)
for _ in range(count):
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(view)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
"""


def raw_socket_seconds(size_bytes: int, repeats: int) -> list[float]:
    """Seconds per transfer of `size_bytes` over TCP loopback: first the sender's connect, then
    recv_into a preallocated, touched buffer until every byte is in; the first one included."""
    target = bytearray(size_bytes)
    target[:] = bytes(size_bytes)  # touched: no page faults inside the timed part
    view = memoryview(target)
    samples_s = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        count = 1 + repeats
        sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(port), str(size_bytes), str(count)])
        try:
            for _ in range(count):
                conn, _ = server.accept()
                with conn:
                    start = time.perf_counter()
                    received = 0
                    while received < size_bytes:
                        n = conn.recv_into(view[received:], min(RECV_CHUNK_BYTES, size_bytes - received))
                        if n == 0:
                            raise ConnectionError(f"sender closed after {received} of {size_bytes} bytes")
                        received += n
                    samples_s.append(time.perf_counter() - start)
                    conn.sendall(b"k")
            if sender.wait(60) != 0:
                raise RuntimeError(f"raw socket sender exited with {sender.returncode}")
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    return samples_s


def median_after_first(samples_s: list[float]) -> float:
    return statistics.median(samples_s[1:] or samples_s)


def gbps(size_bytes: int, seconds: float) -> float:
    return size_bytes / seconds / 1e9
