"""A direct restore: the trainer fetches data fragments from their holders into its tensors.

The holders here are small TCP servers that speak the bulk channel's get (a ticket in, the
fragment's bytes out); the snapshot is laid out and checksummed as the Checkpointer and the
agent do it."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import crc32c
import numpy as np
import pytest
import torch

from memckpt.agent.checksum import CHUNK_BYTES, chunk_checksums, combine_crc32c
from memckpt.agent.store import DirectFragment, DirectPlan
from memckpt.errors import CorruptSnapshot, InvalidRequest, Unavailable
from memckpt.trainer.direct import DIRECT, DROPPED, KEPT, Checksums, Span, _Run, layout_spans, pieces, restore_direct
from memckpt.trainer.layout import compute_layout
from memckpt.trainer.tree import decode_meta, encode_meta, flatten, live_tensors


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pairs:
        dst.copy_(src)


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(("len_a", "len_b"), [(0, 5), (5, 0), (1, 1), (100, 4096), (3, 5 << 20)])
def test_combined_crcs_are_the_crc_of_the_concatenation(len_a: int, len_b: int) -> None:
    a, b = os.urandom(len_a), os.urandom(len_b)
    assert combine_crc32c(crc32c.crc32c(a), crc32c.crc32c(b), len_b) == crc32c.crc32c(a + b)


def test_spans_send_live_tensors_direct_keep_the_others_and_drop_the_padding() -> None:
    table = [{"offset": 0, "nbytes": 10}, {"offset": 64, "nbytes": 8}, {"offset": 128, "nbytes": 0}, {"offset": 128, "nbytes": 4}]
    assert layout_spans(192, table, direct={0, 3}) == [
        Span(0, 10, DIRECT, 0),
        Span(10, 64, DROPPED),
        Span(64, 72, KEPT, 1),
        Span(72, 128, DROPPED),
        Span(128, 132, DIRECT, 3),
        Span(132, 192, DROPPED),
    ]
    with pytest.raises(InvalidRequest, match="overlaps"):
        layout_spans(192, [{"offset": 0, "nbytes": 70}, {"offset": 64, "nbytes": 8}], direct=set())
    with pytest.raises(InvalidRequest, match="overlaps"):
        layout_spans(64, [{"offset": 0, "nbytes": 70}], direct=set())


def test_pieces_end_at_spans_checksum_chunks_the_piece_size_and_the_data() -> None:
    size = CHUNK_BYTES + 100
    spans = [Span(0, 50, DIRECT, 0), Span(50, size, KEPT, 1)]
    got = list(pieces(0, CHUNK_BYTES + 200, size, spans, piece_bytes=CHUNK_BYTES // 2))
    assert [(a, b) for a, b, _ in got] == [
        (0, 50),
        (50, 50 + CHUNK_BYTES // 2),
        (50 + CHUNK_BYTES // 2, CHUNK_BYTES),  # the checksum chunk ends
        (CHUNK_BYTES, size),
        (size, CHUNK_BYTES + 200),  # past the data: the fragment's padding
    ]
    assert [s.kind if s else None for _, _, s in got] == [DIRECT, KEPT, KEPT, KEPT, None]


def test_checksums_join_runs_from_any_fragment_in_any_order_and_notice_a_hole() -> None:
    data = os.urandom(CHUNK_BYTES + 1000)
    cut = CHUNK_BYTES - 300  # fragment 1 begins inside chunk 0
    runs = [
        _Run(chunk=1, start=CHUNK_BYTES, length=1000, crc=crc32c.crc32c(data[CHUNK_BYTES:])),
        _Run(chunk=0, start=cut, length=300, crc=crc32c.crc32c(data[cut:CHUNK_BYTES])),
        _Run(chunk=0, start=0, length=cut, crc=crc32c.crc32c(data[:cut])),
    ]
    sums = Checksums(len(data))
    for run in runs:
        sums.add(run)
    assert sums.sums() == chunk_checksums(memoryview(data), len(data), b"")[:-1]
    holed = Checksums(len(data))
    for run in runs[:2]:
        holed.add(run)
    with pytest.raises(CorruptSnapshot, match="were not received"):
        holed.sums()


def test_live_tensors_are_found_without_changing_the_state() -> None:
    w, m = torch.ones(4), torch.zeros(2)
    state: dict[str, Any] = {"model": {"w": w}, "optim": [m, "x"], "extra": 3}
    tree = flatten({"model": {"w": w, "b": torch.ones(1)}, "optim": [m, "x"], "extra": 3}).tree
    before = repr(state)
    assert live_tensors(state, tree) == {0: w, 2: m}
    assert repr(state) == before


# -- against real sockets ----------------------------------------------------------------


def snapshot_of(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """The slot bytes and the metadata the Checkpointer would commit for `state`."""
    flat = flatten(state)
    layout = compute_layout(flat.specs)
    image = bytearray(layout.size_bytes)
    for tensor, placement in zip(flat.tensors, layout.placements):
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        image[placement.offset : placement.offset + len(raw)] = raw
    meta = encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes)
    return bytes(image), meta


@contextmanager
def holders(fragments: list[bytes], *, cut_after: int | None = None) -> Iterator[list[DirectFragment]]:
    """A TCP server per fragment that takes one ticket and sends the fragment (or `cut_after` bytes of it)."""
    servers, threads = [], []
    described = []
    for index, data in enumerate(fragments):
        server = socket.create_server(("127.0.0.1", 0))
        ticket = secrets.token_bytes(32)

        def serve(server: socket.socket = server, ticket: bytes = ticket, data: bytes = data) -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                got = b""
                while len(got) < len(ticket):
                    more = conn.recv(len(ticket) - len(got))
                    if not more:
                        return
                    got += more
                if got == ticket:
                    conn.sendall(data if cut_after is None else data[:cut_after])

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        port = server.getsockname()[1]
        described.append(DirectFragment(index=index, node=f"node{index + 1}", host="127.0.0.1", port=port, ticket=ticket))
    try:
        yield described
    finally:
        for server in servers:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes a thread still waiting in accept()
            except OSError:
                pass
            server.close()
        for thread in threads:
            thread.join(timeout=10)


def plan_for(image: bytes, meta: bytes, fragments: list[DirectFragment], k: int) -> DirectPlan:
    size = len(image)
    sums = chunk_checksums(memoryview(image), size, meta)
    return DirectPlan(
        step=7, data_size_bytes=size, fragment_bytes=-(-size // k), meta=meta, checksums=sums, fragments=tuple(fragments)
    )


def split(image: bytes, k: int) -> list[bytes]:
    size = -(-len(image) // k)
    return [image[i * size : (i + 1) * size].ljust(size, b"\0") for i in range(k)]


def stored_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(3000, generator=generator), "h": torch.randn(40, 50, generator=generator).half()},
        "optim": {"m": torch.randn(1000, generator=generator), "step": torch.tensor(12)},
        "rng": np.arange(100, dtype=np.int64),
        "lr": 0.5,
    }


def test_the_fragments_land_in_the_live_tensors_and_the_rest_is_filled_from_the_scratch() -> None:
    expected = stored_state()
    image, meta = snapshot_of(expected)
    live_w = torch.zeros(3000)
    live_h = torch.zeros(50, 40).half().t()  # same shape, not contiguous: through the scratch
    state: dict[str, Any] = {"model": {"w": live_w, "h": live_h}, "optim": {}, "rng": np.zeros(100, dtype=np.int64)}
    with holders(split(image, 2)) as fragments:
        received = restore_direct(state, plan_for(image, meta, fragments, 2), decode_meta(meta), copy_pairs)
    assert received == len(image)
    assert state["model"]["w"] is live_w and torch.equal(live_w, expected["model"]["w"])
    assert state["model"]["h"] is live_h and torch.equal(live_h, expected["model"]["h"])
    assert torch.equal(state["optim"]["m"], expected["optim"]["m"]), "a tensor the state lacked is set"
    assert int(state["optim"]["step"]) == 12
    assert np.array_equal(state["rng"], expected["rng"]) and state["lr"] == 0.5


@pytest.mark.parametrize("k", [1, 3])
def test_any_number_of_data_fragments_restore_bit_exactly(k: int) -> None:
    expected = stored_state()
    image, meta = snapshot_of(expected)
    state: dict[str, Any] = {"model": {"w": torch.zeros(3000)}}
    with holders(split(image, k)) as fragments:
        restore_direct(state, plan_for(image, meta, fragments, k), decode_meta(meta), copy_pairs)
    assert torch.equal(state["model"]["w"], expected["model"]["w"])


def test_a_corrupt_byte_fails_the_owners_checksums() -> None:
    image, meta = snapshot_of(stored_state())
    fragments = split(image, 2)
    rotten = bytearray(fragments[1])
    rotten[17] ^= 0x01
    with holders([fragments[0], bytes(rotten)]) as described:
        with pytest.raises(CorruptSnapshot, match=r"checksum chunks \[0\] do not match the owner's checksums"):
            restore_direct({"model": {}}, plan_for(image, meta, described, 2), decode_meta(meta), copy_pairs)


def test_metadata_that_does_not_match_its_checksum_is_refused_before_any_byte() -> None:
    image, meta = snapshot_of(stored_state())
    with holders(split(image, 2)) as described:
        plan = plan_for(image, meta, described, 2)
        forged = DirectPlan(**{**{f: getattr(plan, f) for f in plan.__slots__}, "meta": meta.replace(b'"lr"', b'"LR"')})
        with pytest.raises(CorruptSnapshot, match="metadata does not match"):
            restore_direct({}, forged, decode_meta(forged.meta), copy_pairs)


def test_a_holder_that_stops_sending_or_cannot_be_reached_is_unavailable() -> None:
    image, meta = snapshot_of(stored_state())
    with holders(split(image, 2), cut_after=100) as described:
        with pytest.raises(Unavailable, match="closed the connection early"):
            restore_direct({}, plan_for(image, meta, described, 2), decode_meta(meta), copy_pairs)
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    gone = DirectFragment(index=0, node="node1", host="127.0.0.1", port=port, ticket=b"t" * 32)
    with pytest.raises(Unavailable, match="cannot connect"):
        restore_direct({}, plan_for(image, meta, [gone], 1), decode_meta(meta), copy_pairs)
