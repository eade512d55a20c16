"""AgentConfig: every setting of `memckpt-agent`, with its reason and its checks."""

from __future__ import annotations

import os
import socket as _socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from memckpt.config import field, split_host_port
from memckpt.errors import ConfigError
from memckpt.names import check_name
from memckpt.security import TlsFiles, resolve_token
from memckpt.sizes import format_size

DEFAULT_MEMORY_FRACTION = 0.5
DEFAULT_PROTECT_CPU = 1.0  # cores: protection takes at most one core of the node on average
SOCKET_ENV = "MEMCKPT_SOCKET"
SHM_DIR_ENV = "MEMCKPT_SHM_DIR"  # the agent's shm_dir setting; ranks map their slots from the same directory


def default_socket() -> Path:
    """Where agent and client meet by default: a per-user directory, so users never collide."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "memckpt" if runtime else Path(f"/tmp/memckpt-{os.getuid()}")
    return base / "agent.sock"


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
    coordinator: str = field("", "host:port of memckpt-coordinator (none: one-node mode)", default_text="none")
    advertise: str = field("", "host:port peers and the coordinator reach this agent at (the fast network)", default_text="none")
    """Port 0 stands for the port `peer_listen` bound (useful with `peer_listen` port 0)."""
    peer_listen: str = field("0.0.0.0:7500", "host:port the peer service binds (with a coordinator); port 0: any free one")
    """Bind it to the interface of the network that carries fragments; the bound port is logged."""
    peer_bulk: bool = field(True, "send fragment bytes on TCP connections of their own, opened over gRPC")
    """Off: fragments travel in gRPC streams, at about 0.6x the bulk channel's rate. The channel
    listens on peer_listen's host, with the same TLS as the peer service."""
    peer_bulk_port: int = field(0, "port of the bulk channel (0: any free one; peers learn it over gRPC)")
    direct_restore: bool = field(True, "a trainer restoring a snapshot that peers hold fetches it from them itself")
    """Straight from the peers' bulk channels into the trainer's tensors, with tickets this agent
    gets for it: no slot of fresh memory, no second copy. Needs the bulk channel and no TLS
    between agents, and trainers that can reach the peers' advertised addresses; otherwise (or
    off) this agent rebuilds the snapshot into a slot of its own and the trainer copies from it."""
    domain: str = field("default", "failure domain (rack) of this node")
    persist_root: Path | None = field(
        None, "shared filesystem directory checkpoints persist to (ROOT/JOB/step-N/, DCP format)", default_text="none: off"
    )
    persist_every: int = field(0, "persist every this many steps (0: not by steps)")
    persist_interval_s: float = field(0.0, "persist at least this often, in seconds (0: not by time)")
    persist_rate: int = field(256 << 20, "write rate limit per agent, bytes/s (0: unlimited)", size=True, default_text="256MiB")
    persist_keep: int = field(3, "complete checkpoints kept per job (older ones go once a newer one is complete)")
    persist_keep_every: int = field(0, "also keep forever every checkpoint whose step is a multiple of this (0: none)")
    persist_on_failure: bool = field(True, "persist a rank's newest snapshot at once when the rank dies uncleanly")
    restore_wait_s: float = field(
        30.0, "a restore with nothing on this node waits this long for the coordinator to say what peers hold"
    )
    put_min_rate_bytes_per_s: int = field(
        32 << 20, "slowest a fragment may stream to a peer before its put is abandoned, bytes per second, e.g. 32MiB", size=True
    )
    """A put's deadline is 5 s plus the fragment's bytes at this rate; a peer slower than that is
    given up on (the step is retried, or a newer one sent), so a cut peer cannot hold a slot pinned."""
    protect_rate: int = field(
        0, "average rate this agent sends fragments to its peers at, bytes per second, e.g. 100MiB (0: no limit)", size=True
    )
    """Protection sends a step at full speed, then rests until the average is back under the limit,
    and then protects the newest step (the ones in between are skipped, never queued)."""
    protect_cpu: float = field(
        DEFAULT_PROTECT_CPU,
        "average CPU the agent may use, in cores (0.5: half of one core; 0: no limit); protection rests while over it",
    )
    """The agent process's CPU time, all threads, counting peers' fragments it receives: it shares the
    node's cores with the trainer ranks. Rests as `protect_rate` does; a pace too slow for the
    snapshots shows as protected steps lagging the committed ones (`memckpt status`)."""
    metrics_listen: str = field(
        "",
        "host:port of the HTTP server for Prometheus (/metrics) and probes (/healthz); port 0: any free one",
        default_text="none: off",
    )
    """The bound address is logged and shown by `memckpt status`."""
    token: str = field("", "shared token sent to the coordinator and peers", default_text="none")
    token_file: Path | None = field(None, "file holding the token instead (kept out of the process list)", default_text="none")
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
        if self.persist_every < 0 or self.persist_interval_s < 0 or self.persist_rate < 0 or self.persist_keep_every < 0:
            raise ConfigError("persist_every, persist_interval_s, persist_rate and persist_keep_every must not be negative")
        if self.persist_keep < 1:
            raise ConfigError(
                f"persist_keep {self.persist_keep} must be at least 1: a checkpoint goes only once a newer one is complete"
            )
        if self.coordinator and self.persist_interval_s:
            raise ConfigError(
                "persist_interval_s needs one agent holding the whole job (no coordinator): agents of a cluster "
                "would persist different steps; use persist_every, which they all count alike"
            )
        if self.persist_root is None and (self.persist_every or self.persist_interval_s):
            raise ConfigError("persist_every / persist_interval_s need persist_root (where checkpoints go)")
        if not 0 <= self.restore_wait_s <= 3600:
            raise ConfigError(f"restore_wait_s {self.restore_wait_s} must be between 0 and 3600")
        if self.protect_rate < 0 or not 0 <= self.protect_cpu <= 1024:
            raise ConfigError(
                f"protect_rate {self.protect_rate} must not be negative, protect_cpu {self.protect_cpu} must be 0..1024 cores"
            )
        if self.put_min_rate_bytes_per_s < 1 << 20:
            raise ConfigError(f"put_min_rate_bytes_per_s {self.put_min_rate_bytes_per_s} must be at least 1MiB (per second)")
        if self.coordinator and not self.advertise:
            raise ConfigError("with a coordinator, advertise must say host:port where peers reach this agent")
        for name in ("peer_listen", "advertise", "metrics_listen"):
            if getattr(self, name):
                split_host_port(getattr(self, name), name)
        self.tls.check()
        object.__setattr__(self, "token", resolve_token(self.token, self.token_file))  # frozen: set once, here
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
