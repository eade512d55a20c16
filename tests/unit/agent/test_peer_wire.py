"""The peer service's hand-encoded chunks are exactly protobuf's; crc combining; decoding in place."""

from __future__ import annotations

import os

import crc32c
import pytest

from memckpt.agent.erasure import Scheme, data_fragment, encode_parity, fresh_buffer, rebuild_missing
from memckpt.agent.fragments import crc32c_combine
from memckpt.agent.peer_service import decode_chunk, encode_chunk
from memckpt.protos import peer_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 1 << 20])
@pytest.mark.parametrize("crc", [0, 1, 0x7F, 0x80, 0xFFFFFFFF])
def test_an_encoded_chunk_is_the_protobuf_message_both_ways(size: int, crc: int) -> None:
    data = os.urandom(size)
    encoded = encode_chunk(memoryview(data), crc)
    for message_type in (pb.FragmentChunk, pb.PutFragmentRequest):
        parsed = message_type.FromString(encoded)
        assert parsed.WhichOneof("part") == "chunk"
        assert (parsed.chunk.data, parsed.chunk.data_crc32c) == (data, crc)
    chunk = decode_chunk(encoded)
    assert chunk is not None and (bytes(chunk.data), chunk.crc32c) == (data, crc)
    # protobuf's own encoding (data first, crc omitted when 0) parses the same
    standard = pb.FragmentChunk(chunk=pb.FragmentData(data=data, data_crc32c=crc)).SerializeToString()
    chunk = decode_chunk(standard)
    assert chunk is not None and (bytes(chunk.data), chunk.crc32c) == (data, crc)


def test_other_messages_are_left_to_protobuf() -> None:
    header = pb.FragmentChunk(header=pb.FragmentHeader(job="j", fragment_index=1)).SerializeToString()
    assert decode_chunk(header) is None
    assert decode_chunk(b"") is None
    encoded = encode_chunk(b"abc", 5)
    assert decode_chunk(encoded[:-1]) is None, "a truncated message is not taken for a chunk"
    assert decode_chunk(encoded + b"\x00") is None


@pytest.mark.parametrize("size_b", [0, 1, 4095, 1 << 20])
def test_crc32c_combine_is_the_crc_of_the_concatenation(size_b: int) -> None:
    a, b = os.urandom(777), os.urandom(size_b)
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


@pytest.mark.parametrize(("k", "m", "lost"), [(2, 1, (0,)), (2, 1, (1,)), (4, 2, (0, 3)), (8, 2, (5,))])
def test_rebuild_missing_decodes_in_place(k: int, m: int, lost: tuple[int, ...]) -> None:
    data = memoryview(os.urandom(1_000_003))
    scheme = Scheme(k=k, m=m, size_bytes=len(data))
    parity = encode_parity(data, scheme)
    size = scheme.fragment_bytes
    out = fresh_buffer(size * k)
    present = [i for i in range(k) if i not in lost]
    for i in present:
        out[i * size : (i + 1) * size] = data_fragment(data, scheme, i)
    rebuild_missing(out, {k + j: memoryview(p) for j, p in enumerate(parity)}, present, scheme, stripe_bytes=64 << 10)
    assert out[: len(data)] == data
