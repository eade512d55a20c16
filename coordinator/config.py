"""CoordinatorConfig: every setting of `memckpt-coordinator`, with its reason and its checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memckpt.config import field, split_host_port
from memckpt.errors import ConfigError
from memckpt.security import TlsFiles, resolve_token


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    listen: str = field("127.0.0.1:7400", "host:port to serve on (port 0: any free port, printed at start)")
    lease_s: float = field(10.0, "an agent whose heartbeats stop for this long is declared failed")
    heartbeat_interval_s: float = field(2.0, "how often agents report (told to them at registration)")
    k: int = field(2, "data fragments per snapshot")
    m: int = field(1, "parity fragments per snapshot (node losses a group survives)")
    tls_cert: Path | None = field(None, "server certificate (PEM); with tls_key turns TLS on", default_text="none")
    tls_key: Path | None = field(None, "server private key (PEM)", default_text="none")
    tls_ca: Path | None = field(None, "CA that signs agents' client certificates: mutual TLS", default_text="none")
    token: str = field("", "shared token every caller must send", default_text="none")
    token_file: Path | None = field(None, "file holding the token instead (kept out of the process list)", default_text="none")
    port_file: Path | None = field(None, "write the port actually bound here (for --listen host:0)", default_text="none")
    metrics_listen: str = field(
        "",
        "host:port of the HTTP server for Prometheus (/metrics) and probes (/healthz); port 0: any free one",
        default_text="none: off",
    )
    state_process: bool = field(
        True,
        "keep the cluster's tables in a second process, so that heartbeats are answered at once however "
        "busy the bookkeeping is (off: one process)",
    )
    log_level: str = field("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen {self.listen!r} must be host:port")
        if self.metrics_listen:
            split_host_port(self.metrics_listen, "metrics_listen")
        if not 0 < self.heartbeat_interval_s < self.lease_s:
            raise ConfigError(f"heartbeat_interval_s {self.heartbeat_interval_s} must be > 0 and below lease_s {self.lease_s}")
        if self.k < 1 or self.m < 0 or self.k + self.m > 256:
            raise ConfigError(f"k={self.k}, m={self.m}: need k >= 1, m >= 0, k + m <= 256")
        self.tls.check()
        object.__setattr__(self, "token", resolve_token(self.token, self.token_file))  # frozen: set once, here

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
