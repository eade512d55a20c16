"""gRPC client of other agents' peer services: send a fragment, fetch one back."""

from __future__ import annotations

from collections.abc import Iterator

import crc32c
import grpc

from memckpt.agent.fragments import SERVE_CHUNK_BYTES, FragmentHeader, check_header
from memckpt.agent.peer_service import header_from_proto, header_to_proto
from memckpt.errors import CorruptSnapshot
from memckpt.protos import peer_pb2 as pb
from memckpt.protos import peer_pb2_grpc as pb_grpc
from memckpt.rpc import error_from_rpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata

PUT_TIMEOUT_S = 300.0


class PeerClient:
    """Channels to peers, one per address, reused across calls."""

    def __init__(self, *, token: str, tls: TlsFiles) -> None:
        self._metadata = token_metadata(token)
        self._credentials = channel_credentials(tls)
        self._channels: dict[str, grpc.Channel] = {}

    def put_fragment(self, address: str, header: FragmentHeader, data: memoryview) -> None:
        """Streams one fragment (header, then crc'd chunks) to the peer at `address`."""

        def messages() -> Iterator[pb.PutFragmentRequest]:
            yield pb.PutFragmentRequest(header=header_to_proto(header))
            for start in range(0, len(data), SERVE_CHUNK_BYTES):
                piece = bytes(data[start : start + SERVE_CHUNK_BYTES])
                yield pb.PutFragmentRequest(chunk=pb.FragmentData(data=piece, data_crc32c=crc32c.crc32c(piece)))

        try:
            self._stub(address).PutFragment(messages(), metadata=self._metadata, timeout=PUT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"PutFragment {header} to {address}") from None

    def get_fragment(self, address: str, job: str, rank: int, index: int, step: int) -> tuple[FragmentHeader, bytes]:
        """A fragment and its header (which carries the snapshot's metadata), every chunk checked."""
        request = pb.GetFragmentRequest(job=job, rank=rank, fragment_index=index, step=step)
        parts = []
        header = None
        try:
            for message in self._stub(address).GetFragment(request, metadata=self._metadata, timeout=PUT_TIMEOUT_S):
                if message.HasField("header"):
                    header = header_from_proto(message.header)
                elif message.HasField("chunk"):
                    if crc32c.crc32c(message.chunk.data) != message.chunk.data_crc32c:
                        raise CorruptSnapshot(f"fragment {index} of job {job!r} rank {rank} from {address}: chunk crc mismatch")
                    parts.append(message.chunk.data)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetFragment job={job} rank={rank} index={index} from {address}") from None
        data = b"".join(parts)
        if header is None or len(data) != header.fragment_bytes or crc32c.crc32c(data) != header.crc32c:
            raise CorruptSnapshot(f"fragment {index} of job {job!r} rank {rank} from {address} is incomplete or corrupt")
        check_header(header)  # the metadata's checksum too
        return header, data

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def _stub(self, address: str) -> pb_grpc.PeerServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
            if self._credentials is not None:
                channel = grpc.secure_channel(address, self._credentials, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
            self._channels[address] = channel
        return pb_grpc.PeerServiceStub(channel)
