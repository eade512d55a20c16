"""gRPC client of other agents' peer services: send a fragment, fetch one back.

Chunks travel pre-encoded (see `peer_service`): a sent chunk is copied once, from the snapshot
straight into its message; a received one is checksummed and copied once, into the caller's
buffer (shared memory, or the buffer a rebuild decodes in), never joined.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import crc32c
import grpc
from google.protobuf.message import DecodeError

from memckpt.agent.erasure import fresh_buffer
from memckpt.agent.fragments import SERVE_CHUNK_BYTES, FragmentHeader, check_header, copy_into, crc32c_combine
from memckpt.agent.peer_service import GET_METHOD, PUT_METHOD, decode_chunk, encode_chunk, header_from_proto, header_to_proto
from memckpt.errors import CorruptSnapshot
from memckpt.protos import peer_pb2 as pb
from memckpt.rpc import error_from_rpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata

PUT_TIMEOUT_S = 300.0
MAX_MESSAGE_BYTES = 8 << 20


class PeerClient:
    """Channels to peers, one per address, reused across calls. Thread-safe."""

    def __init__(self, *, token: str, tls: TlsFiles) -> None:
        self._metadata = token_metadata(token)
        self._credentials = channel_credentials(tls)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def put_fragment(self, address: str, header: FragmentHeader, data: memoryview) -> None:
        """Streams one fragment (header, then crc'd chunks) to the peer at `address`."""

        def messages() -> Iterator[bytes]:
            yield pb.PutFragmentRequest(header=header_to_proto(header)).SerializeToString()
            for start in range(0, len(data), SERVE_CHUNK_BYTES):
                piece = data[start : start + SERVE_CHUNK_BYTES]
                yield encode_chunk(piece, int(crc32c.crc32c(piece)))

        put: grpc.StreamUnaryMultiCallable[bytes, pb.PutFragmentResponse] = self._channel(address).stream_unary(
            PUT_METHOD, request_serializer=None, response_deserializer=pb.PutFragmentResponse.FromString
        )
        try:
            put(messages(), metadata=self._metadata, timeout=PUT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"PutFragment {header} to {address}") from None

    def get_fragment(
        self, address: str, job: str, rank: int, index: int, step: int, into: memoryview | None = None
    ) -> tuple[FragmentHeader, memoryview]:
        """A fragment and its header (which carries the snapshot's metadata), every chunk checked.

        The bytes land in `into` (exactly the fragment's size) when given, else in a new buffer;
        either way the view returned holds them. On an error `into` may hold part of them.
        """
        request = pb.GetFragmentRequest(job=job, rank=rank, fragment_index=index, step=step)
        what = f"fragment {index} of job {job!r} rank {rank} from {address}"
        get: grpc.UnaryStreamMultiCallable[pb.GetFragmentRequest, bytes] = self._channel(address).unary_stream(
            GET_METHOD, request_serializer=pb.GetFragmentRequest.SerializeToString, response_deserializer=None
        )
        header: FragmentHeader | None = None
        target = into
        received = crc = 0
        call = get(request, metadata=self._metadata, timeout=PUT_TIMEOUT_S)
        try:
            for message in call:
                chunk = decode_chunk(message)
                if chunk is None:  # not a pre-encoded chunk: parse it
                    parsed = _parse_chunk(message, what)
                    if parsed.HasField("header"):
                        if header is not None:
                            raise CorruptSnapshot(f"{what}: a second header")
                        header = header_from_proto(parsed.header)
                        check_header(header)  # sizes and the metadata's checksum
                        target = _target(into, header.fragment_bytes, what)
                        continue
                    if not parsed.HasField("chunk"):
                        raise CorruptSnapshot(f"{what}: an empty message")
                    chunk_data: memoryview | bytes = parsed.chunk.data
                    chunk_crc = parsed.chunk.data_crc32c
                else:
                    chunk_data, chunk_crc = chunk.data, chunk.crc32c
                if target is None or header is None:
                    raise CorruptSnapshot(f"{what}: data before the header")
                size = len(chunk_data)
                if received + size > header.fragment_bytes:
                    raise CorruptSnapshot(f"{what}: chunks run past fragment_bytes {header.fragment_bytes}")
                if crc32c.crc32c(chunk_data) != chunk_crc:
                    raise CorruptSnapshot(f"{what}: chunk crc mismatch")
                copy_into(target[received : received + size], chunk_data)
                crc = crc32c_combine(crc, chunk_crc, size)
                received += size
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetFragment job={job} rank={rank} index={index} from {address}") from None
        except BaseException:
            call.cancel()  # the peer stops sending what nobody reads
            raise
        if header is None or target is None or received != header.fragment_bytes or crc != header.crc32c:
            raise CorruptSnapshot(f"{what} is incomplete or corrupt")
        return header, target

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            return self._channels.get(address) or self._channels.setdefault(address, self._open(address))

    def _open(self, address: str) -> grpc.Channel:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self._credentials is not None:
            return grpc.secure_channel(address, self._credentials, options=options)
        return grpc.insecure_channel(address, options=options)


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
