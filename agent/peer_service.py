"""PeerService over gRPC: a thin layer over FragmentStore. Errors map through `memckpt.rpc`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from memckpt.agent.fragments import Chunk, FragmentHeader, FragmentStore, iter_chunks
from memckpt.errors import InvalidRequest
from memckpt.protos import peer_pb2 as pb
from memckpt.protos import peer_pb2_grpc as pb_grpc
from memckpt.rpc import map_errors, map_stream_errors


class PeerServicer(pb_grpc.PeerServiceServicer):
    def __init__(self, store: FragmentStore) -> None:
        self._store = store

    @map_errors
    def PutFragment(self, request_iterator: Iterator[pb.PutFragmentRequest], context: Any) -> pb.PutFragmentResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("PutFragment: the first message must be the fragment header")
        stored = self._store.put(header_from_proto(first.header), chunks_from_proto(request_iterator))
        return pb.PutFragmentResponse(stored_bytes=stored)

    @map_stream_errors
    def GetFragment(self, request: pb.GetFragmentRequest, context: Any) -> Iterator[pb.FragmentChunk]:
        step = request.step if request.HasField("step") else None
        header, view = self._store.open_fragment(request.job, request.rank, request.fragment_index, step)
        yield pb.FragmentChunk(header=header_to_proto(header))
        for chunk in iter_chunks(view):
            yield pb.FragmentChunk(chunk=pb.FragmentData(data=chunk.data, data_crc32c=chunk.crc32c))


def chunks_from_proto(messages: Iterator[pb.PutFragmentRequest]) -> Iterator[Chunk]:
    for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidRequest("PutFragment: after the header only data chunks may follow")
        yield Chunk(data=message.chunk.data, crc32c=message.chunk.data_crc32c)


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
    )
