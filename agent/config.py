"""AgentConfig: every setting of `memckpt-agent`, with its reason and its checks."""

from __future__ import annotations

import os
import socket as _socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from memckpt.config import field
from memckpt.errors import ConfigError
from memckpt.names import check_name
from memckpt.security import TlsFiles
from memckpt.sizes import format_size

DEFAULT_MEMORY_FRACTION = 0.5
SOCKET_ENV = "MEMCKPT_SOCKET"


def default_socket() -> Path:
    """Where agent and client meet by default: a per-user directory, so users never collide."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "memckpt" if runtime else Path(f"/tmp/memckpt-{os.getuid()}")
    return base / "agent.sock"


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """`host:port` (the host may be `[v6]`) as a pair; raises ConfigError naming `what`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {address!r} must be host:port with a port in 0..65535")
    return host, int(port)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    socket: Path = field(default_socket(), "unix socket the trainer ranks of this node connect to (made 0600)")
    """Its directory is created 0700 if missing, and must belong to the agent's user."""
    node: str = field(_socket.gethostname().split(".")[0] or "node", "node id shown in status and logs")
    shm_dir: Path = field(Path("/dev/shm"), "directory of POSIX shared memory")
    shm_prefix: str = field("memckpt.", "prefix of every shm segment this agent owns (one prefix per agent)")
    """Two agents on one machine must have different prefixes; a restarted agent re-adopts its prefix."""
    memory_limit: int | None = field(
        None, "budget for snapshot slots, e.g. 8GiB", size=True, default_text="half of the memory available at start"
    )
    on_exit: str = field("keep", "what a clean stop does with the slots", choices=("keep", "remove"))
    """`keep` leaves them for the next agent to re-adopt (upgrades, restarts); `remove` unlinks them."""
    max_message_bytes: int = field(64 << 20, "largest gRPC message accepted (layout metadata)", size=True)
    coordinator: str = field("", "host:port of memckpt-coordinator (default: none, one-node mode)", default_text="none")
    advertise: str = field("", "host:port peers and the coordinator reach this agent at (the fast network)", default_text="none")
    """Port 0 stands for the port `peer_listen` bound (useful with `peer_listen` port 0)."""
    peer_listen: str = field("0.0.0.0:7500", "host:port the peer service binds (with a coordinator); port 0: any free one")
    """Bind it to the interface of the network that carries fragments; the bound port is logged."""
    domain: str = field("default", "failure domain (rack) of this node")
    restore_wait_s: float = field(
        30.0, "a restore with nothing on this node waits this long for the coordinator to say what peers hold"
    )
    token: str = field("", "shared token sent to the coordinator and peers", default_text="none")
    tls_cert: Path | None = field(None, "this agent's certificate (PEM), for mutual TLS", default_text="none")
    tls_key: Path | None = field(None, "this agent's private key (PEM)", default_text="none")
    tls_ca: Path | None = field(None, "CA of the coordinator's and peers' certificates", default_text="none")
    log_level: str = field("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        check_name(self.node, "node")
        if not self.shm_prefix or not self.shm_prefix.endswith(".") or "/" in self.shm_prefix:
            raise ConfigError(f"shm_prefix {self.shm_prefix!r} must be a plain name ending in '.'")
        check_name(self.shm_prefix[:-1], "shm_prefix")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ConfigError(f"memory_limit must be positive, got {self.memory_limit}")
        check_name(self.domain, "domain")
        if not 0 <= self.restore_wait_s <= 3600:
            raise ConfigError(f"restore_wait_s {self.restore_wait_s} must be between 0 and 3600")
        if self.coordinator and not self.advertise:
            raise ConfigError("with a coordinator, advertise must say host:port where peers reach this agent")
        for name in ("peer_listen", "advertise"):
            if getattr(self, name):
                split_host_port(getattr(self, name), name)
        self.tls.check()
        if len(str(self.socket)) > 100:
            raise ConfigError(f"socket path {self.socket} is longer than a unix socket allows (~107 bytes)")

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    def advertised_address(self, peer_port: int) -> str:
        """`advertise`, with port 0 replaced by the port the peer service bound."""
        host, port = split_host_port(self.advertise, "advertise")
        return f"{host}:{peer_port}" if port == 0 else self.advertise

    def memory_limit_bytes(self) -> int:
        if self.memory_limit is not None:
            return self.memory_limit
        return int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)

    def describe_budget(self) -> str:
        return format_size(self.memory_limit_bytes())
