"""TLS credentials and the shared token of memckpt's TCP services.

Every TCP service takes a certificate and key (and a CA: then clients must present a
certificate too, i.e. mutual TLS), and a shared token that callers send as
`authorization: Bearer <token>` metadata. Without them a service says in its log that it
runs unauthenticated. Unix sockets are protected by file permissions instead.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from memckpt.errors import ConfigError

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"  # probes (kubelet) carry no token


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def check(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs both a certificate and its key (tls_cert and tls_key)")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} does not exist")


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials | None:
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    ca = tls.ca.read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials | None:
    """Client side: trust `ca`, and present cert/key when given (mutual TLS)."""
    if tls.ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext | None:
    """`server_credentials` for a plain socket (the agents' bulk channel): the same certificate,
    and with a CA the same demand for a client certificate it signed."""
    if not tls.enabled:
        return None
    assert tls.cert is not None and tls.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(cafile=tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext | None:
    """`channel_credentials` for a plain socket: trust `ca` (and check the host name, as gRPC
    does), present cert/key when given."""
    if tls.ca is None:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key for a CLI command that calls a TLS service (defaults: the
    MEMCKPT_TLS_* variables the daemons read, so a node's own settings work as they are)."""
    for name, what in (
        ("ca", "CA of the service's certificate: turns TLS on"),
        ("cert", "this client's certificate, for a service that asks for one (mutual TLS)"),
        ("key", "the private key of --tls-cert"),
    ):
        env = f"MEMCKPT_TLS_{name.upper()}"
        default = os.environ.get(env)
        parser.add_argument(
            f"--tls-{name}",
            type=Path,
            default=Path(default) if default else None,
            metavar=name.upper(),
            help=f"{what} (default: ${env})",
        )


def client_tls(args: argparse.Namespace) -> TlsFiles:
    """The TLS files `add_client_tls_flags` parsed; a certificate without its key (or the other way) is a ConfigError."""
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    tls.check()
    return tls


MAX_TOKEN_FILE_BYTES = 4096


def read_token_file(path: Path) -> str:
    """The token in `path` (its first line, without surrounding white space): a token given on
    a command line shows in every user's `ps`, one in a file does not. The file must not be
    writable by others (whoever could change it could lock the cluster out or let anyone in)."""
    try:
        info = path.stat()
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"token_file {path} is {info.st_size} bytes: not a token file")
        if stat.S_IMODE(info.st_mode) & 0o022:
            raise ConfigError(
                f"token_file {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); chmod go-w it"
            )
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read token_file {path}: {exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"token_file {path} is empty")
    return token


def resolve_token(token: str, token_file: Path | None) -> str:
    """The token a daemon or command uses: `token`, or the one in `token_file`; both is an error."""
    if token_file is None:
        return token
    if token:
        raise ConfigError("give the token or token_file, not both")
    return read_token_file(token_file)


def add_token_flags(parser: argparse.ArgumentParser) -> None:
    """--token and --token-file for a CLI command that calls a service (defaults: MEMCKPT_TOKEN,
    MEMCKPT_TOKEN_FILE, as the daemons read them)."""
    parser.add_argument(
        "--token", default=os.environ.get("MEMCKPT_TOKEN", ""), metavar="T", help="the cluster token (default: $MEMCKPT_TOKEN)"
    )
    token_file = os.environ.get("MEMCKPT_TOKEN_FILE")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=Path(token_file) if token_file else None,
        metavar="PATH",
        help="read the token from this file instead, out of the process list (default: $MEMCKPT_TOKEN_FILE)",
    )


def client_token(args: argparse.Namespace) -> str:
    """The token `add_token_flags` parsed (ConfigError for both, or for a bad file)."""
    return resolve_token(args.token, args.token_file)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the shared token (UNAUTHENTICATED); health checks pass."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if details.method.startswith(HEALTH_METHOD_PREFIX):
            return continuation(details)
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(presented).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)  # only looked at for its kind: nothing of it runs
        return None if handler is None else deny_handler(handler)


def deny_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind (unary or streaming, each way) as `handler` that answers UNAUTHENTICATED.

    gRPC drives the call by the kind of the handler it gets, so a refusal of another kind
    than the method's breaks the call instead of answering it with the status.
    """

    def deny(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (authorization: Bearer ...)")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(deny)


def describe_security(service: str, tls: TlsFiles, token: str) -> str:
    """One log line about how `service` is protected; warns when it is not."""
    if not tls.enabled and not token:
        message = f"{service} runs UNAUTHENTICATED and unencrypted: give it --tls-cert/--tls-key/--tls-ca and --token"
        log.warning(message)
        return message
    parts = ["mutual TLS" if tls.ca else "TLS" if tls.enabled else "no TLS", "token" if token else "no token"]
    return f"{service} security: {', '.join(parts)}"
