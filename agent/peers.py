"""gRPC client of other agents' peer services: send a fragment, fetch one back.

Chunks travel pre-encoded (see `peer_service`): a sent chunk is copied once, from the snapshot
straight into its message; a received one is checksummed and copied once, into the caller's
buffer or wherever its sink writes it (a rebuilt slot's file), never joined.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import crc32c
import grpc
from google.protobuf.message import DecodeError

from memckpt.agent import bulk
from memckpt.agent.erasure import fresh_buffer
from memckpt.agent.fragments import SERVE_CHUNK_BYTES, Chunk, FragmentHeader, check_header, copy_into, crc32c_combine
from memckpt.agent.peer_service import (
    GET_METHOD,
    OPEN_METHOD,
    PUT_METHOD,
    READ_AHEAD_MESSAGES,
    decode_chunk,
    encode_chunk,
    header_from_proto,
    header_to_proto,
    read_ahead,
)
from memckpt.config import split_host_port
from memckpt.errors import CorruptSnapshot, MemckptError, Unavailable
from memckpt.protos import peer_pb2 as pb
from memckpt.rpc import error_from_rpc
from memckpt.security import TlsFiles, channel_credentials, client_ssl_context, token_metadata

log = logging.getLogger(__name__)

NO_BULK_RETRY_S = 60.0  # a peer whose bulk channel could not be used is asked again after this
PUT_TIMEOUT_S = 300.0  # the ceiling of any peer call
PUT_BASE_S = 5.0  # a put's deadline: this, plus its bytes at the slowest rate it may run at
DEFAULT_PUT_MIN_RATE_BYTES_PER_S = 32 << 20
MAX_MESSAGE_BYTES = 8 << 20
# A peer cut off the network (packets black-holed, nothing refused) fails a call within about
# keepalive time + timeout, instead of when its deadline comes; pings go also while no data can
# (`max_pings_without_data` 0: no limit), and the peer servers accept them (peer_service.SERVER_OPTIONS).
KEEPALIVE_TIME_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

WriteAt = Callable[[int, "bytes | memoryview"], None]  # (offset, data): where a fetched fragment's chunks go


def put_timeout_s(fragment_bytes: int, min_rate_bytes_per_s: float = DEFAULT_PUT_MIN_RATE_BYTES_PER_S) -> float:
    """The deadline of a put of `fragment_bytes`: a few seconds, plus the bytes at the slowest
    rate a healthy peer streams at (shared by the k + m puts of a step), capped at PUT_TIMEOUT_S."""
    if fragment_bytes < 0 or min_rate_bytes_per_s <= 0:
        raise ValueError(f"put of {fragment_bytes} bytes at {min_rate_bytes_per_s} bytes/s: both must be positive")
    return min(PUT_BASE_S + fragment_bytes / min_rate_bytes_per_s, PUT_TIMEOUT_S)


class PeerClient:
    """Channels to peers, one per address, reused across calls. Thread-safe.

    Fragment bytes go on a peer's bulk channel (agent/bulk.py, with TLS when `tls` has a CA)
    when `bulk` is on and the peer offers one, else in gRPC streams."""

    def __init__(self, *, token: str, tls: TlsFiles, bulk: bool = True) -> None:
        self._metadata = token_metadata(token)
        self._credentials = channel_credentials(tls)
        self._bulk = bulk
        self._bulk_tls = client_ssl_context(tls)
        self._channels: dict[str, grpc.Channel] = {}
        self._no_bulk: dict[str, float] = {}  # address -> until when its bulk channel is not tried again
        self._lock = threading.Lock()

    def put_fragment(self, address: str, header: FragmentHeader, data: memoryview, *, timeout_s: float | None = None) -> None:
        """Streams one fragment (header, then crc'd chunks) to the peer at `address`, and waits for it.

        `timeout_s`: the call's deadline, by default `put_timeout_s` of the fragment's size.
        Raises the memckpt error of a refused or failed put (Unavailable past the deadline)."""
        self.start_put(address, header, data, timeout_s=timeout_s).result()

    def start_put(self, address: str, header: FragmentHeader, data: memoryview, *, timeout_s: float | None = None) -> PutCall:
        """Starts sending one fragment to the peer at `address`, on its bulk channel if it has
        one (on a thread of the call's own), else in a gRPC stream (on gRPC's threads).

        `data` is read until the call ends or `PutCall.cancel()` returns, never after."""
        deadline_s = put_timeout_s(len(data)) if timeout_s is None else timeout_s
        if self._bulk_usable(address):
            return BulkPutCall(self, address, header, data, deadline_s)
        return self._start_grpc_put(address, header, data, deadline_s)

    def _start_grpc_put(self, address: str, header: FragmentHeader, data: memoryview, deadline_s: float) -> GrpcPutCall:
        put: grpc.StreamUnaryMultiCallable[bytes, pb.PutFragmentResponse] = self._channel(address).stream_unary(
            PUT_METHOD, request_serializer=None, response_deserializer=pb.PutFragmentResponse.FromString
        )
        messages = _PutMessages(pb.PutFragmentRequest(header=header_to_proto(header)).SerializeToString(), data)
        # encoded a few chunks ahead, on a thread of their own, while gRPC sends the one before
        encoded = read_ahead(iter(messages), READ_AHEAD_MESSAGES, "put-encode", stop=messages.closed)
        future = put.future(encoded, metadata=self._metadata, timeout=deadline_s)
        return GrpcPutCall(future, messages, f"PutFragment {header} to {address}")

    def get_fragment(
        self, address: str, job: str, rank: int, index: int, step: int, into: memoryview | None = None
    ) -> tuple[FragmentHeader, memoryview]:
        """A fragment and its header (which carries the snapshot's metadata), every chunk checked.

        The bytes land in `into` (exactly the fragment's size) when given, else in a new buffer;
        either way the view returned holds them. On an error `into` may hold part of them.
        """
        target = into

        def open_target(header: FragmentHeader) -> WriteAt:
            nonlocal target
            target = _target(into, header.fragment_bytes, f"fragment {index} of job {job!r} rank {rank} from {address}")
            return lambda offset, data: copy_into(target[offset : offset + len(data)], data)

        header = self.receive_fragment(address, job, rank, index, step, open_target)
        assert target is not None  # set with the header
        return header, target

    def receive_fragment(
        self, address: str, job: str, rank: int, index: int, step: int, open_sink: Callable[[FragmentHeader], WriteAt]
    ) -> FragmentHeader:
        """Streams a fragment and returns its header: first the header, checked, for which
        `open_sink(header)` returns where the bytes go (or raises to refuse it); then each chunk,
        checked against its crc, to `write_at(offset in the fragment, data)`, in order; at the
        end, all of them against the fragment's crc. On an error part of them may be written.
        The bytes come on the peer's bulk channel if it has one, else in a gRPC stream."""
        request = pb.GetFragmentRequest(job=job, rank=rank, fragment_index=index, step=step)
        what = f"fragment {index} of job {job!r} rank {rank} from {address}"
        if self._bulk_usable(address):
            fetched = self._bulk_get(address, request, open_sink, what)
            if fetched is not None:
                return fetched
        get: grpc.UnaryStreamMultiCallable[pb.GetFragmentRequest, bytes] = self._channel(address).unary_stream(
            GET_METHOD, request_serializer=pb.GetFragmentRequest.SerializeToString, response_deserializer=None
        )
        header: FragmentHeader | None = None
        write_at: WriteAt | None = None
        received = crc = 0
        call = get(request, metadata=self._metadata, timeout=PUT_TIMEOUT_S)
        try:
            for message in read_ahead(call, READ_AHEAD_MESSAGES, "get-receive"):  # received while the one before is copied
                part = _read_message(message, what)
                if isinstance(part, FragmentHeader):
                    if header is not None:
                        raise CorruptSnapshot(f"{what}: a second header")
                    check_header(part)  # sizes and the metadata's checksum
                    header, write_at = part, open_sink(part)
                    continue
                if header is None or write_at is None:
                    raise CorruptSnapshot(f"{what}: data before the header")
                size = len(part.data)
                if received + size > header.fragment_bytes:
                    raise CorruptSnapshot(f"{what}: chunks run past fragment_bytes {header.fragment_bytes}")
                if part.crc32c is None or crc32c.crc32c(part.data) != part.crc32c:
                    raise CorruptSnapshot(f"{what}: chunk crc mismatch")
                write_at(received, part.data)
                crc = crc32c_combine(crc, part.crc32c, size)
                received += size
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetFragment job={job} rank={rank} index={index} from {address}") from None
        except BaseException:
            call.cancel()  # the peer stops sending what nobody reads
            raise
        if header is None or received != header.fragment_bytes or crc != header.crc32c:
            raise CorruptSnapshot(f"{what} is incomplete or corrupt")
        return header

    def _bulk_get(
        self, address: str, request: pb.GetFragmentRequest, open_sink: Callable[[FragmentHeader], WriteAt], what: str
    ) -> FragmentHeader | None:
        """`receive_fragment` on the bulk channel; None when the peer has none (or it cannot be reached)."""
        opened = self.open_transfer(address, pb.OpenTransferRequest(get=request), PUT_BASE_S, what)
        if opened is None:
            return None
        header = header_from_proto(opened.header)
        check_header(header)
        write_at = open_sink(header)
        conn = self.bulk_connect(address, opened, PUT_TIMEOUT_S)
        if conn is None:
            return None
        with conn:
            bulk.receive_fragment(conn, header, write_at, what)
        return header

    @property
    def hands_out_tickets(self) -> bool:
        """Whether a get's bulk ticket may be handed to a local trainer to redeem: not with TLS
        between agents (the trainer has no client certificate), nor without the bulk channel."""
        return self._bulk and self._bulk_tls is None

    def get_ticket(
        self, address: str, job: str, rank: int, index: int, step: int
    ) -> tuple[FragmentHeader, str, int, bytes] | None:
        """A ticket for fetching fragment `index` from the peer's bulk channel, for someone else
        (a trainer on this node) to redeem: (the fragment's header, checked; host; port; ticket).
        None when `hands_out_tickets` is off or the peer has no bulk channel."""
        if not self.hands_out_tickets or not self._bulk_usable(address):
            return None
        what = f"fragment {index} of job {job!r} rank {rank} on {address}"
        request = pb.GetFragmentRequest(job=job, rank=rank, fragment_index=index, step=step)
        opened = self.open_transfer(address, pb.OpenTransferRequest(get=request), PUT_BASE_S, what)
        if opened is None:
            return None
        header = header_from_proto(opened.header)
        check_header(header)
        host, _ = split_host_port(address, "peer address")
        return header, host, opened.port, opened.ticket

    def open_transfer(
        self, address: str, request: pb.OpenTransferRequest, timeout_s: float, what: str
    ) -> pb.OpenTransferResponse | None:
        """A bulk transfer opened on the peer; None when it has no bulk channel (remembered for a while)."""
        open_call: grpc.UnaryUnaryMultiCallable[pb.OpenTransferRequest, pb.OpenTransferResponse] = self._channel(
            address
        ).unary_unary(
            OPEN_METHOD,
            request_serializer=pb.OpenTransferRequest.SerializeToString,
            response_deserializer=pb.OpenTransferResponse.FromString,
        )
        try:
            return open_call(request, metadata=self._metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:  # FAILED_PRECONDITION is the transfer's (a stale placement)
                self._avoid_bulk(address, f"it offers none ({exc.details() if isinstance(exc, grpc.Call) else exc})")
                return None
            raise error_from_rpc(exc, f"OpenTransfer for {what}") from None

    def bulk_connect(self, address: str, opened: pb.OpenTransferResponse, timeout_s: float) -> socket.socket | None:
        """A connection to the peer's bulk channel, its ticket sent; None (remembered) if it cannot be reached."""
        host, _ = split_host_port(address, "peer address")
        try:
            return bulk.connect(host, opened.port, opened.ticket, timeout_s, self._bulk_tls)
        except OSError as exc:
            self._avoid_bulk(address, f"port {opened.port} unreachable ({exc}); a firewall?")
            return None

    def _bulk_usable(self, address: str) -> bool:
        if not self._bulk:
            return False
        with self._lock:
            until = self._no_bulk.get(address)
            if until is not None and until > time.monotonic():
                return False
            self._no_bulk.pop(address, None)
            return True

    def _avoid_bulk(self, address: str, why: str) -> None:
        with self._lock:
            first = address not in self._no_bulk
            self._no_bulk[address] = time.monotonic() + NO_BULK_RETRY_S
        if first:
            log.warning("bulk channel of %s not used for %.0f s: %s; fragments go in gRPC streams", address, NO_BULK_RETRY_S, why)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            return self._channels.get(address) or self._channels.setdefault(address, self._open(address))

    def _open(self, address: str) -> grpc.Channel:
        options = list(CHANNEL_OPTIONS)
        if self._credentials is not None:
            return grpc.secure_channel(address, self._credentials, options=options)
        return grpc.insecure_channel(address, options=options)


class _PutMessages:
    """The messages of one put: its header, then `data` in crc'd chunks, each copied once into
    its message. After `close()` returns no chunk is read any more: the caller may let `data` go."""

    def __init__(self, header: bytes, data: memoryview) -> None:
        self._header = header
        self._data = data
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield self._header
        for start in range(0, len(self._data), SERVE_CHUNK_BYTES):
            with self._lock:  # a chunk is read whole, or not at all once closed
                if self.closed.is_set():
                    return
                piece = self._data[start : start + SERVE_CHUNK_BYTES]
                message = encode_chunk(piece, int(crc32c.crc32c(piece)))
            yield message

    def close(self) -> None:
        with self._lock:
            self.closed.set()


class GrpcPutCall:
    """One PutFragment in flight (`PeerClient.start_put`): wait for its end, or cancel it."""

    def __init__(self, future: grpc.Future[pb.PutFragmentResponse], messages: _PutMessages, what: str) -> None:
        self._future = future
        self._messages = messages
        self.what = what
        future.add_done_callback(lambda _: messages.close())  # a failed call stops reading `data` too

    def done(self) -> bool:
        return bool(self._future.done())

    def add_done_callback(self, callback: Callable[[], object]) -> None:
        """Calls `callback()` when the call ends (at once if it has), on whichever thread ends it."""

        def call(_: object) -> None:
            callback()

        self._future.add_done_callback(call)

    def cancel(self) -> None:
        """Ends the call (the peer drops what it received); `data` is not read after this returns."""
        self._messages.close()
        self._future.cancel()

    def error(self) -> MemckptError | None:
        """None if the peer stored the fragment; else why not (the call must be done)."""
        try:
            self._future.result(timeout=0)
        except grpc.FutureCancelledError:
            return Unavailable(f"{self.what}: cancelled")
        except grpc.RpcError as exc:
            return error_from_rpc(exc, self.what)
        return None

    def result(self) -> None:
        """Waits for the call's end; raises the memckpt error of a refused or failed put."""
        try:
            self._future.result()
        except grpc.FutureCancelledError:
            raise Unavailable(f"{self.what}: cancelled") from None
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.what) from None


def _read_message(message: bytes, what: str) -> FragmentHeader | Chunk:
    """A pre-encoded chunk (its data a view of the message), or what protobuf parses: a header or a chunk."""
    chunk = decode_chunk(message)
    if chunk is not None:
        return chunk
    parsed = _parse_chunk(message, what)
    if parsed.HasField("header"):
        return header_from_proto(parsed.header)
    if not parsed.HasField("chunk"):
        raise CorruptSnapshot(f"{what}: an empty message")
    return Chunk(data=parsed.chunk.data, crc32c=parsed.chunk.data_crc32c)


def _parse_chunk(message: bytes, what: str) -> pb.FragmentChunk:
    try:
        return pb.FragmentChunk.FromString(message)
    except DecodeError as exc:
        raise CorruptSnapshot(f"{what}: a malformed message ({exc})") from None


def _target(into: memoryview | None, size: int, what: str) -> memoryview:
    if into is None:
        return fresh_buffer(size)
    if len(into) != size:
        raise CorruptSnapshot(f"{what}: the header says {size} bytes, {len(into)} expected")
    return into


class BulkPutCall:
    """One put on a peer's bulk channel (`PeerClient.start_put`), on a thread of its own; the
    same interface as `GrpcPutCall`. When the peer turns out to have no bulk channel, the put
    goes in a gRPC stream instead, within the same call."""

    def __init__(self, peers: PeerClient, address: str, header: FragmentHeader, data: memoryview, deadline_s: float) -> None:
        self.what = f"put of {header} to {address}"
        self._peers, self._address, self._header, self._data = peers, address, header, data
        self._deadline = time.monotonic() + deadline_s
        self._future: Future[None] = Future()
        self._lock = threading.Lock()  # held while a chunk of `data` is sent: cancel() waits for it
        self._cancelled = False
        self._conn: socket.socket | None = None
        self._fallback: GrpcPutCall | None = None
        self._future.set_running_or_notify_cancel()
        threading.Thread(target=self._run, name="bulk-put", daemon=True).start()

    def _run(self) -> None:
        try:
            self._put()
        except MemckptError as exc:
            self._future.set_exception(exc)
        except Exception as exc:  # the call must end, whatever happened
            log.exception("%s failed", self.what)
            self._future.set_exception(Unavailable(f"{self.what}: {type(exc).__name__}: {exc}"))
        else:
            self._future.set_result(None)

    def _put(self) -> None:
        peers, header = self._peers, self._header
        request = pb.OpenTransferRequest(put=header_to_proto(header))
        opened = peers.open_transfer(self._address, request, min(PUT_BASE_S, self._left_s()), self.what)
        conn = peers.bulk_connect(self._address, opened, self._left_s()) if opened is not None else None
        if conn is None:
            with self._lock:
                if self._cancelled:
                    raise Unavailable(f"{self.what}: cancelled")
                self._fallback = peers._start_grpc_put(self._address, header, self._data, self._left_s())
            self._fallback.result()
            return
        with conn:
            with self._lock:
                self._conn = conn
            conn.settimeout(min(bulk.IO_TIMEOUT_S, max(0.001, self._left_s())))
            bulk.send_fragment(conn, self._data, self.what, self._send_chunk)

    def _send_chunk(self, conn: socket.socket, piece: memoryview) -> None:
        """Sends one chunk of `data`, unless the call was cancelled or ran past its deadline."""
        with self._lock:
            if self._cancelled:
                raise Unavailable(f"{self.what}: cancelled")
            if self._left_s() <= 0:
                raise Unavailable(f"{self.what}: deadline exceeded")
            conn.sendall(piece)

    def _left_s(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[], object]) -> None:
        """Calls `callback()` when the call ends (at once if it has), on whichever thread ends it."""
        self._future.add_done_callback(lambda _: callback())

    def cancel(self) -> None:
        """Ends the call (the peer drops what it received); `data` is not read after this returns."""
        self._cancelled = True
        conn = self._conn
        if conn is not None:  # a send blocked on a stalled peer ends now
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:  # no chunk of `data` is being sent from here on
            fallback = self._fallback
        if fallback is not None:
            fallback.cancel()

    def error(self) -> MemckptError | None:
        """None if the peer stored the fragment; else why not (the call must be done)."""
        exc = self._future.exception(timeout=0)
        return exc if isinstance(exc, MemckptError) or exc is None else Unavailable(f"{self.what}: {exc}")

    def result(self) -> None:
        """Waits for the call's end; raises the memckpt error of a refused or failed put."""
        self._future.result()


PutCall = GrpcPutCall | BulkPutCall
