"""The bulk channel's pure parts: one-time tickets, a put's verdict, reading exact byte counts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from memckpt.agent import bulk
from memckpt.agent.fragments import FragmentHeader
from memckpt.errors import BudgetExceeded, CorruptSnapshot, MemckptError, PermissionDenied, StaleGeneration, Unavailable

Pair = tuple[socket.socket, socket.socket]
HEADER = FragmentHeader(
    job="j", rank=0, step=1, generation=1, index=0, k=2, m=1, size_bytes=8, fragment_bytes=4, owner="node0", crc32c=0
)


def test_a_ticket_is_good_for_one_connection_within_its_time() -> None:
    tickets = bulk.Tickets(ttl_s=10.0, max_open=4)
    transfer = bulk.PutTransfer(HEADER)
    ticket = tickets.issue(transfer, now=0.0)
    assert len(ticket) == bulk.TICKET_BYTES
    assert tickets.redeem(bytes(bulk.TICKET_BYTES), now=1.0) is None  # made-up bytes
    assert tickets.redeem(ticket, now=1.0) is transfer
    assert tickets.redeem(ticket, now=1.0) is None  # used
    late = tickets.issue(transfer, now=0.0)
    assert tickets.redeem(late, now=10.5) is None  # expired
    assert len(tickets) == 0


def test_tickets_are_unguessable_and_bounded() -> None:
    tickets = bulk.Tickets(ttl_s=10.0, max_open=3)
    issued = {tickets.issue(bulk.PutTransfer(HEADER), now=0.0) for _ in range(3)}
    assert len(issued) == 3
    with pytest.raises(Unavailable, match="3 bulk transfers are open"):
        tickets.issue(bulk.PutTransfer(HEADER), now=1.0)
    assert tickets.issue(bulk.PutTransfer(HEADER), now=11.0)  # the old ones expired meanwhile


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


REFUSALS = [CorruptSnapshot("crc"), PermissionDenied("not placed"), BudgetExceeded("full"), StaleGeneration("old")]


@pytest.mark.parametrize("error", REFUSALS)
def test_a_refused_put_raises_the_receivers_error_on_the_sender(
    pair: tuple[socket.socket, socket.socket], error: MemckptError
) -> None:
    sender, receiver = pair
    receiver.sendall(bulk.encode_verdict(error))
    with pytest.raises(type(error), match=f"put x: {error}"):
        bulk.read_verdict(sender, "put x")


def test_a_stored_put_reads_as_ok_and_a_missing_verdict_as_unavailable(pair: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = pair
    receiver.sendall(bulk.encode_verdict(None))
    bulk.read_verdict(sender, "put x")  # no error
    receiver.close()
    with pytest.raises(Unavailable, match="no verdict"):
        bulk.read_verdict(sender, "put x")


def test_socket_chunks_yield_exactly_the_bytes_sent_and_a_short_stream_fails(pair: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = pair
    data = bytes(range(256)) * 40
    sender.sendall(data)
    buffer = memoryview(bytearray(1000))
    pieces = [bytes(c.data) for c in bulk.socket_chunks(receiver, len(data), buffer)]
    assert b"".join(pieces) == data and max(map(len, pieces)) == 1000
    assert all(c.crc32c is None for c in bulk.socket_chunks(receiver, 0, buffer))
    sender.sendall(data[:10])
    sender.close()
    with pytest.raises(ConnectionError, match="10 bytes still to come|still to come"):
        list(bulk.socket_chunks(receiver, 20, buffer))
