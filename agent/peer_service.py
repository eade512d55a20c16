"""PeerService over gRPC: a thin layer over FragmentStore. Errors map through `memckpt.rpc`.

Bulk bytes travel as pre-encoded messages: a data chunk is serialized by hand into the exact
protobuf encoding of `PutFragmentRequest{chunk}` / `FragmentChunk{chunk}` (the two share field
numbers), with the data copied once, from shared memory straight into the message, and parsed
by hand into a view of the received message, which is checksummed and copied into place without
another copy. Any other valid encoding (the header, or a chunk from a generated stub) is parsed
by protobuf, so the wire format is still exactly what protos/peer.proto says.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import crc32c
import grpc

from memckpt.agent import metrics
from memckpt.agent.bulk import BulkServer
from memckpt.agent.fragments import SERVE_CHUNK_BYTES, Chunk, FragmentHeader, FragmentStore, crc32c_combine
from memckpt.errors import CorruptSnapshot, InvalidRequest
from memckpt.protos import peer_pb2 as pb
from memckpt.rpc import map_errors, map_stream_errors

SERVICE = "memckpt.v1.PeerService"
PUT_METHOD = f"/{SERVICE}/PutFragment"
GET_METHOD = f"/{SERVICE}/GetFragment"
OPEN_METHOD = f"/{SERVICE}/OpenTransfer"

# protobuf tags: (field number << 3) | wire type
_TAG_CHUNK = 0x12  # field 2 (chunk), length-delimited, of PutFragmentRequest and FragmentChunk
_TAG_DATA = 0x0A  # field 1 (data), length-delimited, of FragmentData
_TAG_CRC = 0x10  # field 2 (data_crc32c), varint, of FragmentData

# The peer server accepts the keepalive pings of peer channels (memckpt.agent.peers.CHANNEL_OPTIONS,
# every 5 s, also while no call runs or no data moves) instead of answering them with GOAWAY
# "too_many_pings"; and pings its clients, so a put from an owner cut off the network ends
# (and its upload's memory goes) within seconds.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for pinging
    ("grpc.http2.max_pings_without_data", 0),
)
READ_AHEAD_MESSAGES = 2  # of a stream, received (or encoded) while the one before is checked and copied
T = TypeVar("T")


class PeerServicer:
    """Takes pre-encoded or parsed messages; `add_to_server` registers it with its (de)serializers."""

    def __init__(self, store: FragmentStore, bulk: BulkServer | None = None) -> None:
        self._store = store
        self._bulk = bulk  # None: no bulk channel here (TLS between agents, or turned off)

    @map_errors
    def PutFragment(self, request_iterator: Iterator[bytes | pb.PutFragmentRequest], context: Any) -> pb.PutFragmentResponse:
        first = next(request_iterator, None)
        header = _as_put_request(first) if first is not None else None
        if header is None or header.WhichOneof("part") != "header":
            raise InvalidRequest("PutFragment: the first message must be the fragment header")
        messages = read_ahead(request_iterator, READ_AHEAD_MESSAGES, "put-receive")
        stored = self._store.put(header_from_proto(header.header), chunks_from_messages(messages))
        metrics.FRAGMENT_RECEIVED_BYTES.inc(stored)
        return pb.PutFragmentResponse(stored_bytes=stored)

    @map_stream_errors
    def GetFragment(self, request: pb.GetFragmentRequest, context: Any) -> Iterator[bytes | pb.FragmentChunk]:
        step = request.step if request.HasField("step") else None
        # verified as it is sent, from the chunks' crcs: one pass over the bytes, not two
        header, view = self._store.open_fragment(request.job, request.rank, request.fragment_index, step, verify=False)
        yield pb.FragmentChunk(header=header_to_proto(header))
        # encoded a few chunks ahead, on a thread of their own, while gRPC sends the one before
        yield from read_ahead(_serve_chunks(header, view), READ_AHEAD_MESSAGES, "get-encode")

    def OpenTransfer(self, request: pb.OpenTransferRequest, context: Any) -> pb.OpenTransferResponse:
        if self._bulk is None:  # UNIMPLEMENTED, as from an agent that predates the channel; not an error of the transfer
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "no bulk channel on this agent (--no-peer-bulk): use PutFragment/GetFragment"
            )
        return self._open_transfer(request, context)

    @map_errors
    def _open_transfer(self, request: pb.OpenTransferRequest, context: Any) -> pb.OpenTransferResponse:
        assert self._bulk is not None
        which = request.WhichOneof("transfer")
        if which == "put":
            ticket = self._bulk.offer_put(header_from_proto(request.put))
            return pb.OpenTransferResponse(port=self._bulk.port, ticket=ticket)
        if which == "get":
            get = request.get
            step = get.step if get.HasField("step") else None
            header, ticket = self._bulk.offer_get(get.job, get.rank, get.fragment_index, step)
            return pb.OpenTransferResponse(port=self._bulk.port, ticket=ticket, header=header_to_proto(header))
        raise InvalidRequest("OpenTransfer: say which transfer (put or get)")


def _serve_chunks(header: FragmentHeader, view: memoryview) -> Iterator[bytes]:
    whole = 0
    for start in range(0, len(view), SERVE_CHUNK_BYTES):
        piece = view[start : start + SERVE_CHUNK_BYTES]
        crc = int(crc32c.crc32c(piece))
        whole = crc32c_combine(whole, crc, len(piece))
        if start + len(piece) == len(view) and whole != header.crc32c:  # before the last chunk: the fragment is never whole
            raise CorruptSnapshot(f"{header}: stored bytes have crc32c {whole:08x}, expected {header.crc32c:08x}")
        yield encode_chunk(piece, crc)


def add_to_server(servicer: PeerServicer, server: grpc.Server) -> None:
    """Registers the service; requests of PutFragment reach it as bytes, parsed in `chunks_from_messages`."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "PutFragment": grpc.stream_unary_rpc_method_handler(
            servicer.PutFragment,
            request_deserializer=None,  # the raw bytes of each message
            response_serializer=pb.PutFragmentResponse.SerializeToString,
        ),
        "GetFragment": grpc.unary_stream_rpc_method_handler(
            servicer.GetFragment,
            request_deserializer=pb.GetFragmentRequest.FromString,
            response_serializer=serialize,
        ),
        "OpenTransfer": grpc.unary_unary_rpc_method_handler(
            servicer.OpenTransfer,
            request_deserializer=pb.OpenTransferRequest.FromString,
            response_serializer=pb.OpenTransferResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def read_ahead(messages: Iterator[T], depth: int, name: str, stop: threading.Event | None = None) -> Iterator[T]:
    """`messages`, pulled by a thread of their own up to `depth` ahead of the caller, so that gRPC
    receiving (or the sender encoding) the next ones overlaps the work on this one (the checksum
    and the copies release the GIL). The thread stops pulling when the caller stops iterating,
    or when `stop` is set; an error of `messages` is raised to the caller in its place."""
    if depth < 1:
        yield from messages
        return
    stopped = stop if stop is not None else threading.Event()
    ready: queue.Queue[tuple[bool, T | None, BaseException | None]] = queue.Queue(maxsize=depth)

    def offer(item: tuple[bool, T | None, BaseException | None]) -> bool:
        while not stopped.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for message in messages:
                if not offer((False, message, None)):
                    return
        except BaseException as exc:  # the stream failed: the caller raises it
            offer((True, None, exc))
            return
        offer((True, None, None))

    threading.Thread(target=pull, name=name, daemon=True).start()
    try:
        while True:
            end, message, error = ready.get()
            if error is not None:
                raise error
            if end:
                return
            yield cast(T, message)  # not the end: a message
    finally:
        stopped.set()


def serialize(message: bytes | Any) -> bytes:
    """A pre-encoded message as it is, a protobuf message serialized."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def encode_chunk(data: memoryview | bytes, crc: int) -> bytes:
    """`{chunk: {data_crc32c: crc, data: data}}` encoded as protobuf does, with one copy of `data`."""
    inner_head = bytes([_TAG_CRC]) + _varint(crc) + bytes([_TAG_DATA]) + _varint(len(data))
    head = bytes([_TAG_CHUNK]) + _varint(len(inner_head) + len(data)) + inner_head
    return b"".join((head, data))


def decode_chunk(message: bytes) -> Chunk | None:
    """The chunk of an encoded `PutFragmentRequest` or `FragmentChunk`, its data a view of
    `message`; None for any other message (a header), or an encoding this does not parse."""
    try:
        if not message or message[0] != _TAG_CHUNK:
            return None
        length, at = _read_varint(message, 1)
        if at + length != len(message):
            return None
        data: memoryview | None = None
        crc = 0
        while at < len(message):
            tag = message[at]
            if tag == _TAG_DATA:
                size, at = _read_varint(message, at + 1)
                if at + size > len(message):
                    return None
                data = memoryview(message)[at : at + size]
                at += size
            elif tag == _TAG_CRC:
                crc, at = _read_varint(message, at + 1)
            else:
                return None
    except IndexError:
        return None
    return Chunk(data=data if data is not None else memoryview(b""), crc32c=crc)


def chunks_from_messages(messages: Iterator[bytes | pb.PutFragmentRequest]) -> Iterator[Chunk]:
    for message in messages:
        chunk = decode_chunk(message) if isinstance(message, bytes) else None
        if chunk is None:
            parsed = _as_put_request(message)
            if parsed is None or parsed.WhichOneof("part") != "chunk":
                raise InvalidRequest("PutFragment: after the header only data chunks may follow")
            chunk = Chunk(data=parsed.chunk.data, crc32c=parsed.chunk.data_crc32c)
        yield chunk


def _as_put_request(message: bytes | pb.PutFragmentRequest) -> pb.PutFragmentRequest | None:
    if not isinstance(message, bytes):
        return message
    try:
        return pb.PutFragmentRequest.FromString(message)
    except Exception:  # a DecodeError: not a PutFragmentRequest
        return None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, offset after it); raises IndexError past the end."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def header_to_proto(header: FragmentHeader) -> pb.FragmentHeader:
    return pb.FragmentHeader(
        job=header.job,
        rank=header.rank,
        step=header.step,
        generation=header.generation,
        fragment_index=header.index,
        k=header.k,
        m=header.m,
        size_bytes=header.size_bytes,
        fragment_bytes=header.fragment_bytes,
        owner_node=header.owner,
        fragment_crc32c=header.crc32c,
        meta=header.meta,
        meta_crc32c=header.meta_crc32c,
        snapshot_checksums=list(header.snapshot_checksums),
        kept_step=header.kept_step,
        kept_generation=header.kept_generation,
    )


def header_from_proto(message: pb.FragmentHeader) -> FragmentHeader:
    return FragmentHeader(
        job=message.job,
        rank=message.rank,
        step=message.step,
        generation=message.generation,
        index=message.fragment_index,
        k=message.k,
        m=message.m,
        size_bytes=message.size_bytes,
        fragment_bytes=message.fragment_bytes,
        owner=message.owner_node,
        crc32c=message.fragment_crc32c,
        meta=message.meta,
        meta_crc32c=message.meta_crc32c,
        snapshot_checksums=tuple(message.snapshot_checksums),
        kept_step=message.kept_step,
        kept_generation=message.kept_generation,
    )
