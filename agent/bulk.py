"""The bulk channel of the peer service: a fragment's bytes on a TCP connection of their own.

gRPC carries a 512 MiB fragment at about 0.55-0.6x of what one plain TCP stream carries on the
same link (bench/peer_transfer.py): every 4 MiB message is framed, copied into and out of
gRPC's buffers and handed between its threads and ours. So only the negotiation goes over
gRPC: the sender (or fetcher) calls `OpenTransfer` on the peer's service, which checks it as
any call (TLS, the token) and checks the transfer itself (the coordinator placed the fragment
there; the fragment exists), and answers with a port and a one-time ticket. The client
connects to that port on the peer's advertised host and sends the ticket; then

- a put: the client sends the fragment's `fragment_bytes` raw bytes, and the receiver, which
  stores them as they come (`FragmentStore.put`: budget, supersession, the fragment's crc32c
  at the end), answers with a verdict: a status byte (a `grpc.StatusCode` value, 0 for OK),
  the length and the text of its message;
- a get: the holder sends the fragment's raw bytes; the fetcher checks them against the
  crc32c in the header that `OpenTransfer` returned.

A ticket is good for one connection, for TICKET_TTL_S, for the transfer it was issued for:
a connection with any other 32 bytes is closed unanswered. With TLS between agents the
connection is TLS too, with the same certificates (and the same demand for a client
certificate with a CA): the ticket then travels encrypted, and only a peer the CA vouches for
gets to send one.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c
import grpc

from memckpt.agent import metrics
from memckpt.agent.fragments import Chunk, FragmentHeader, FragmentStore
from memckpt.errors import CorruptSnapshot, MemckptError, Unavailable
from memckpt.rpc import STATUS, exception_for_status

log = logging.getLogger(__name__)

TICKET_BYTES = 32
TICKET_TTL_S = 30.0  # from OpenTransfer to the connection
MAX_OPEN_TICKETS = 256  # issued and not yet redeemed; beyond, OpenTransfer is refused (UNAVAILABLE)
MAX_CONNECTIONS = 32  # served at once; more are closed at once
TICKET_TIMEOUT_S = 5.0  # a connection must send its ticket within this (an idle one holds a slot)
IO_TIMEOUT_S = 30.0  # a connection that moves nothing for this long is cut (its upload discarded)
CHUNK_BYTES = 4 << 20  # bytes moved (and checksummed) per step
_VERDICT = struct.Struct("!BI")  # status code, length of the message that follows
MAX_VERDICT_MESSAGE = 64 << 10


@dataclass(frozen=True, slots=True)
class PutTransfer:
    header: FragmentHeader


@dataclass(frozen=True, slots=True)
class GetTransfer:
    header: FragmentHeader
    view: memoryview  # the stored fragment (its mapping stays while the view lives)


Transfer = PutTransfer | GetTransfer


class Tickets:
    """One-time tickets for transfers: issued by OpenTransfer, redeemed by one connection.
    Pure logic: the caller passes the monotonic time. Thread-safe."""

    def __init__(self, ttl_s: float = TICKET_TTL_S, max_open: int = MAX_OPEN_TICKETS) -> None:
        self._ttl_s = ttl_s
        self._max_open = max_open
        self._open: dict[bytes, tuple[float, Transfer]] = {}
        self._lock = threading.Lock()

    def issue(self, transfer: Transfer, now: float) -> bytes:
        """A new ticket for `transfer`; raises Unavailable while too many are open."""
        with self._lock:
            self._expire(now)
            if len(self._open) >= self._max_open:
                raise Unavailable(f"{len(self._open)} bulk transfers are open on this agent; try again")
            ticket = secrets.token_bytes(TICKET_BYTES)
            self._open[ticket] = (now + self._ttl_s, transfer)
            return ticket

    def redeem(self, ticket: bytes, now: float) -> Transfer | None:
        """The transfer of a ticket issued and not yet redeemed or expired; None for any other bytes."""
        with self._lock:
            self._expire(now)
            found = self._open.pop(ticket, None)
            return found[1] if found is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _expire(self, now: float) -> None:
        for ticket in [t for t, (deadline, _) in self._open.items() if deadline < now]:
            del self._open[ticket]


def encode_verdict(error: MemckptError | None) -> bytes:
    """A put's verdict: OK, or the status and message of the error that refused it."""
    if error is None:
        return _VERDICT.pack(0, 0)
    code = STATUS.get(type(error), grpc.StatusCode.INTERNAL)
    message = str(error).encode()[:MAX_VERDICT_MESSAGE]
    return _VERDICT.pack(code.value[0], len(message)) + message


def read_verdict(conn: socket.socket, what: str) -> None:
    """Reads a put's verdict; raises the memckpt error it names (Unavailable when there is none)."""
    try:
        head = recv_exact(conn, _VERDICT.size)
        status, length = _VERDICT.unpack(head)
        if length > MAX_VERDICT_MESSAGE:
            raise Unavailable(f"{what}: a malformed verdict ({length} bytes of message)")
        message = recv_exact(conn, length).decode(errors="replace")
    except OSError as exc:
        raise Unavailable(f"{what}: no verdict from the peer ({exc})") from None
    if status == 0:
        return
    code = next((c for c in grpc.StatusCode if c.value[0] == status), grpc.StatusCode.UNKNOWN)
    raise exception_for_status(code)(f"{what}: {message}")


def recv_exact(conn: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes; raises ConnectionError when the peer closes before."""
    buffer = bytearray(size)
    recv_exact_into(conn, memoryview(buffer))
    return bytes(buffer)


def recv_exact_into(conn: socket.socket, view: memoryview) -> None:
    while view:
        received = conn.recv_into(view)
        if received == 0:
            raise ConnectionError(f"the peer closed the connection with {len(view)} bytes still to come")
        view = view[received:]


def socket_chunks(conn: socket.socket, size: int, buffer: memoryview) -> Iterator[Chunk]:
    """`size` bytes from `conn` as chunks in `buffer` (reused: each is consumed before the next
    is read), unchecked: the fragment's crc32c covers them all."""
    received = 0
    while received < size:
        piece = buffer[: min(len(buffer), size - received)]
        recv_exact_into(conn, piece)
        received += len(piece)
        yield Chunk(data=piece, crc32c=None)


class BulkServer:
    """Accepts bulk connections on `host:port` (port 0: any free one) for the transfers its
    `Tickets` were issued for; each connection is served on a thread of its own."""

    def __init__(
        self, store: FragmentStore, host: str, port: int, tickets: Tickets | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self._store = store
        self._tls = tls  # None: plain TCP (no TLS between agents)
        self.tickets = tickets or Tickets()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="bulk-accept", daemon=True)
        self._thread.start()

    def offer_put(self, header: FragmentHeader) -> bytes:
        """A ticket to send `header`'s fragment here; raises what the store would refuse it for."""
        self._store.admit(header)
        return self.tickets.issue(PutTransfer(header), time.monotonic())

    def offer_get(self, job: str, rank: int, index: int, step: int | None) -> tuple[FragmentHeader, bytes]:
        """The header of a stored fragment and a ticket to fetch its bytes; raises NotFound."""
        header, view = self._store.open_fragment(job, rank, index, step, verify=False)
        return header, self.tickets.issue(GetTransfer(header, view), time.monotonic())

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=timeout_s)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed: stopping
            if not self._slots.acquire(blocking=False):
                log.warning("bulk connection from %s refused: %d are served already", peer, MAX_CONNECTIONS)
                conn.close()
                continue
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name="bulk-serve", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            conn.settimeout(TICKET_TIMEOUT_S)
            if self._tls is not None:
                plain = conn
                try:
                    conn = self._tls.wrap_socket(plain, server_side=True)  # the handshake, within the timeout
                except (ssl.SSLError, OSError) as exc:
                    log.warning("bulk connection from %s refused: TLS handshake failed: %s", peer, exc)
                    plain.close()
                    return
                with self._lock:
                    self._connections.discard(plain)
                    self._connections.add(conn)
            transfer = self.tickets.redeem(recv_exact(conn, TICKET_BYTES), time.monotonic())
            if transfer is None:
                log.warning("bulk connection from %s refused: unknown or expired ticket", peer)
                return
            conn.settimeout(IO_TIMEOUT_S)
            if isinstance(transfer, PutTransfer):
                self._receive(conn, transfer.header)
            else:
                self._send(conn, transfer)
        except OSError as exc:
            log.warning("bulk connection from %s ended early: %s", peer, exc)
        except Exception:  # a connection's thread must not die silently
            log.exception("bulk connection from %s failed", peer)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            self._slots.release()

    def _receive(self, conn: socket.socket, header: FragmentHeader) -> None:
        error: MemckptError | None = None
        buffer = memoryview(bytearray(min(CHUNK_BYTES, max(1, header.fragment_bytes))))
        try:
            self._store.put(header, socket_chunks(conn, header.fragment_bytes, buffer))
            metrics.FRAGMENT_RECEIVED_BYTES.inc(header.fragment_bytes)
        except MemckptError as exc:
            log.info("bulk put of %s refused: %s", header, exc)
            error = exc
        conn.sendall(encode_verdict(error))
        if error is not None:  # the sender may still be sending: let it read the verdict first
            conn.shutdown(socket.SHUT_WR)
            _drain(conn, deadline=time.monotonic() + 2.0)

    def _send(self, conn: socket.socket, transfer: GetTransfer) -> None:
        view = transfer.view
        for start in range(0, len(view), CHUNK_BYTES):
            if self._stopping.is_set():
                return
            conn.sendall(view[start : start + CHUNK_BYTES])


def _drain(conn: socket.socket, deadline: float) -> None:
    """Reads and drops what the peer still sends, until it closes or `deadline`."""
    scratch = bytearray(1 << 16)
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if conn.recv_into(scratch) == 0:
                return
        except OSError:
            return


# --- the client side --------------------------------------------------------------------------


def connect(host: str, port: int, ticket: bytes, timeout_s: float, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connection to a peer's bulk channel (TLS with `tls`, the peer's name checked as `host`), its ticket sent."""
    conn = socket.create_connection((host, port), timeout=min(timeout_s, IO_TIMEOUT_S))
    try:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_hostname=host)
        conn.sendall(ticket)
    except BaseException:
        conn.close()
        raise
    return conn


def send_fragment(
    conn: socket.socket, data: memoryview, what: str, send_chunk: Callable[[socket.socket, memoryview], None]
) -> None:
    """Sends a fragment's bytes on a put's connection, chunk by chunk through
    `send_chunk(conn, piece)` (which may refuse to go on by raising), and waits for the
    verdict; raises the error the receiver refused the fragment with."""
    try:
        for start in range(0, len(data), CHUNK_BYTES):
            send_chunk(conn, data[start : start + CHUNK_BYTES])
    except OSError as exc:  # refused midway: the verdict, if it came, says why
        read_verdict(conn, what)
        raise Unavailable(f"{what}: the connection broke ({exc})") from None
    read_verdict(conn, what)


def receive_fragment(conn: socket.socket, header: FragmentHeader, write_at: Callable[[int, memoryview], None], what: str) -> None:
    """Receives a fragment's bytes, checked against the header's crc32c, into `write_at(offset, data)`."""
    buffer = memoryview(bytearray(min(CHUNK_BYTES, max(1, header.fragment_bytes))))
    crc = received = 0
    try:
        for chunk in socket_chunks(conn, header.fragment_bytes, buffer):
            size = len(chunk.data)
            crc = int(crc32c.crc32c(chunk.data, crc))
            write_at(received, memoryview(chunk.data))
            received += size
    except OSError as exc:
        raise Unavailable(f"{what}: the connection broke after {received} of {header.fragment_bytes} bytes ({exc})") from None
    if crc != header.crc32c:
        raise CorruptSnapshot(f"{what}: received bytes have crc32c {crc:08x}, the header says {header.crc32c:08x}")
