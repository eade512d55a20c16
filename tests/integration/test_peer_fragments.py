"""The agents' peer service as real processes: fragments placed by the coordinator, over TCP, with the token."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import crc32c
import grpc
import pytest

from memckpt.agent import bulk
from memckpt.agent.erasure import Scheme, data_fragment, decode, encode_parity
from memckpt.agent.fragments import FragmentHeader, fragment_prefix
from memckpt.agent.peer_service import SERVER_OPTIONS, SERVICE
from memckpt.agent.peers import BulkPutCall, PeerClient
from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.errors import CorruptSnapshot, StaleGeneration, Unavailable
from memckpt.local import AgentProcess, CoordinatorProcess, wait_until
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.protos import peer_pb2 as pb
from memckpt.protos import peer_pb2_grpc as pb_grpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata

pytestmark = pytest.mark.integration
TOKEN = "peer-s3cret"
NODES = tuple(f"node{i}" for i in range(5))
CHUNK_BYTES = 256 << 10
DATA = bytes(range(251)) * 4099  # ~1 MiB, not a multiple of k: the last data fragment is padded
SCHEME = Scheme(k=2, m=1, size_bytes=len(DATA))


@dataclass
class Cluster:
    coordinator: CoordinatorProcess
    agents: dict[str, AgentProcess]
    agent_args: dict[str, tuple[str, ...]]

    def addresses(self) -> dict[str, str]:
        """node -> peer address of the live agents, as the coordinator tells them."""
        with grpc.insecure_channel(self.coordinator.address) as channel:
            status = cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
                cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
            )
        return {a.agent.node: a.agent.address for a in status.agents if a.alive and a.group >= 0}


@pytest.fixture
def cluster(tmp_path: Path, shm_prefix: str, agent_factory) -> Iterator[Cluster]:  # noqa: ANN001
    coordinator = CoordinatorProcess(
        workdir=tmp_path, extra_args=["--lease-s", "2", "--heartbeat-interval-s", "0.2", "--k", "2", "--m", "1", "--token", TOKEN]
    ).start()
    base = shm_prefix.removesuffix(".")
    agent_args = {
        node: (
            *("--node", node, "--coordinator", coordinator.address, "--token", TOKEN, "--domain", f"rack{i}"),
            *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--shm-prefix", f"{base}-{node}."),
        )
        for i, node in enumerate(NODES)
    }
    agents = {node: agent_factory(name=node, extra_args=args) for node, args in agent_args.items()}
    result = Cluster(coordinator=coordinator, agents=agents, agent_args=agent_args)
    try:
        wait_until(lambda: sorted(result.addresses()) == list(NODES), 30, "all agents in a protection group")
        yield result
    finally:
        codes = [agent.stop() for agent in agents.values()]
        assert coordinator.stop() == 0, f"see {coordinator.log_path}"
        # each agent has its own prefix (so the fixture's own check does not see them): check them here
        leftovers = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(f"{base}-"))
        for name in leftovers:
            (DEFAULT_ROOT / name).unlink(missing_ok=True)
        assert not leftovers, f"agents left shared memory behind: {leftovers}"
        assert all(code in (0, -9) for code in codes), codes


def restart_agent(cluster: Cluster, node: str, *extra_args: str, kill: bool = False) -> None:
    """Stops (or SIGKILLs) a node's agent and starts it again on the same shm prefix, with
    `extra_args` added; returns once the coordinator knows its new address."""
    old = cluster.addresses()[node]
    agent = cluster.agents[node]
    if kill:
        agent.kill()
    else:
        agent.stop()
    restarted = AgentProcess(
        socket_path=agent.socket_path,
        shm_prefix=agent.shm_prefix,
        memory_limit="1GiB",
        log_path=agent.log_path,
        extra_args=["--on-exit", "remove", *cluster.agent_args[node], *extra_args],
    )
    cluster.agents[node] = restarted.start()
    wait_until(lambda: cluster.addresses().get(node, old) != old, 30, f"{node} to register its new address")


def fragments() -> dict[int, bytes]:
    view = memoryview(DATA)
    data = [bytes(data_fragment(view, SCHEME, i)) for i in range(SCHEME.k)]
    return dict(enumerate(data + [bytes(p) for p in encode_parity(view, SCHEME)]))


def header(index: int, fragment: bytes, step: int = 5) -> pb.FragmentHeader:
    return pb.FragmentHeader(
        job="j",
        rank=0,
        step=step,
        generation=1,
        fragment_index=index,
        k=SCHEME.k,
        m=SCHEME.m,
        size_bytes=SCHEME.size_bytes,
        fragment_bytes=SCHEME.fragment_bytes,
        owner_node="node0",
        fragment_crc32c=crc32c.crc32c(fragment),
    )


def put_messages(index: int, fragment: bytes, step: int = 5, corrupt_chunk: int | None = None) -> Iterator[pb.PutFragmentRequest]:
    yield pb.PutFragmentRequest(header=header(index, fragment, step))
    for n, start in enumerate(range(0, len(fragment), CHUNK_BYTES)):
        data = fragment[start : start + CHUNK_BYTES]
        crc = crc32c.crc32c(data)
        if n == corrupt_chunk:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # flipped after the sender's checksum: damaged in transit
        yield pb.PutFragmentRequest(chunk=pb.FragmentData(data=data, data_crc32c=crc))


def put(address: str, messages: Iterator[pb.PutFragmentRequest], token: str = TOKEN) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.PeerServiceStub(channel).PutFragment(messages, metadata=token_metadata(token), timeout=10)
    return int(reply.stored_bytes)


def get(address: str, index: int, step: int | None = None, token: str = TOKEN) -> bytes:
    """A fragment's bytes, after checking every chunk's crc32c and the whole fragment's."""
    request = pb.GetFragmentRequest(job="j", rank=0, fragment_index=index, step=step)
    with grpc.insecure_channel(address) as channel:
        replies = list(pb_grpc.PeerServiceStub(channel).GetFragment(request, metadata=token_metadata(token), timeout=10))
    head = replies[0].header
    assert (head.fragment_index, head.owner_node, head.fragment_bytes) == (index, "node0", SCHEME.fragment_bytes)
    assert all(crc32c.crc32c(r.chunk.data) == r.chunk.data_crc32c for r in replies[1:])
    data = b"".join(r.chunk.data for r in replies[1:])
    assert crc32c.crc32c(data) == head.fragment_crc32c
    return data


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def when_placed(address: str, messages: Callable[[], Iterator[pb.PutFragmentRequest]]) -> grpc.StatusCode:
    """The status of a put, retried while the peer has not yet heard its group from the coordinator."""
    codes: list[grpc.StatusCode] = []

    def attempt() -> bool:
        try:
            put(address, messages())
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
        return codes[-1] != grpc.StatusCode.FAILED_PRECONDITION

    wait_until(attempt, 15, f"a put to {address} past FAILED_PRECONDITION", interval_s=0.2)
    return codes[-1]


def test_fragments_are_placed_served_checked_and_survive_an_agent_kill(cluster: Cluster) -> None:
    addresses = cluster.addresses()
    holders = choose_fragment_holders("node0", tuple(sorted(addresses)), SCHEME.k + SCHEME.m)
    assert holders == ("node1", "node2", "node3")
    frags = fragments()
    for index, node in enumerate(holders):
        assert when_placed(addresses[node], lambda index=index: put_messages(index, frags[index])) == grpc.StatusCode.OK
    got = {index: get(addresses[node], index) for index, node in enumerate(holders)}
    assert got == frags
    for pair in ((0, 1), (0, 2), (1, 2)):  # any k of the k+m give back the exact bytes
        assert bytes(decode({i: got[i] for i in pair}, SCHEME)) == DATA

    # a peer the placement does not name refuses, and so does the owner itself
    for node in ("node4", "node0", "node2"):
        assert when_placed(addresses[node], lambda: put_messages(0, frags[0])) == grpc.StatusCode.PERMISSION_DENIED, node

    # a chunk damaged in transit: DATA_LOSS, nothing of step 6 is kept, step 5 still served
    assert status_of(lambda: put(addresses["node2"], put_messages(1, frags[1], step=6, corrupt_chunk=1))) == (
        grpc.StatusCode.DATA_LOSS
    )
    assert status_of(lambda: get(addresses["node2"], 1, step=6)) == grpc.StatusCode.NOT_FOUND
    assert get(addresses["node2"], 1) == frags[1]

    # without the token (or with a wrong one) both directions are refused
    for token in ("", "wrong"):
        assert status_of(lambda token=token: put(addresses["node3"], put_messages(2, frags[2]), token)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert status_of(lambda token=token: get(addresses["node3"], 2, token=token)) == grpc.StatusCode.UNAUTHENTICATED

    # kill -9 a holder and restart it on the same shm prefix: it re-adopts and serves the fragment
    restart_agent(cluster, "node1", kill=True)
    assert get(cluster.addresses()["node1"], 0, step=5) == frags[0]


def test_a_peer_port_in_use_is_refused_at_start(tmp_path: Path, shm_prefix: str) -> None:
    import socket

    from memckpt.errors import Unavailable
    from memckpt.local import AgentProcess

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    agent = AgentProcess(
        socket_path=tmp_path / "busy.sock",
        shm_prefix=shm_prefix,
        memory_limit="64MiB",
        log_path=tmp_path / "busy.log",
        extra_args=[
            "--on-exit",
            "remove",
            "--coordinator",
            "127.0.0.1:1",
            "--advertise",
            "127.0.0.1:0",
            "--peer-listen",
            f"127.0.0.1:{port}",
        ],
    )
    try:
        with pytest.raises(Unavailable, match="exited with 2"):
            agent.start(timeout_s=30)
        assert "cannot listen on peer_listen" in agent.log_path.read_text()
    finally:
        agent.stop()
        taken.close()


def test_steps_sent_by_peer_client_reuse_the_holders_segments_and_survive_a_kill(cluster: Cluster) -> None:
    """Each new step lands in a dropped step's segment (no new shared memory per put); the
    newest complete step is what a restarted holder re-adopts and serves, every byte checked."""
    addresses = cluster.addresses()
    frag = fragments()[0]
    base = header(0, frag)
    fragment_header = FragmentHeader(
        job=base.job,
        rank=base.rank,
        step=5,
        generation=base.generation,
        index=0,
        k=base.k,
        m=base.m,
        size_bytes=base.size_bytes,
        fragment_bytes=base.fragment_bytes,
        owner=base.owner_node,
        crc32c=base.fragment_crc32c,
    )
    peers = PeerClient(token=TOKEN, tls=TlsFiles())
    args = cluster.agent_args["node1"]
    prefix = fragment_prefix(args[args.index("--shm-prefix") + 1])

    def segments() -> set[int]:
        return {p.stat().st_ino for p in DEFAULT_ROOT.iterdir() if p.name.startswith(prefix) and "manifest" not in p.name}

    try:
        wait_until(
            lambda: _stored(peers, addresses["node1"], fragment_header, frag), 15, "node1 to hear its group", interval_s=0.2
        )
        seen: set[int] = set()
        for step in range(6, 14):
            peers.put_fragment(addresses["node1"], replace(fragment_header, step=step), memoryview(frag))
            seen |= segments()
        assert len(seen) <= 4, f"{len(seen)} segments for 9 steps: each step got new shared memory"
        assert len(segments()) == 3  # steps 12 and 13, and the spare
        _, got = peers.get_fragment(addresses["node1"], "j", 0, 0, 13)
        assert bytes(got) == frag
    finally:
        peers.close()

    restart_agent(cluster, "node1", kill=True)
    assert get(cluster.addresses()["node1"], 0, step=13) == frag
    assert status_of(lambda: get(cluster.addresses()["node1"], 0, step=11)) == grpc.StatusCode.NOT_FOUND


def _stored(peers: PeerClient, address: str, fragment_header: FragmentHeader, data: bytes) -> bool:
    try:
        peers.put_fragment(address, fragment_header, memoryview(data))
    except StaleGeneration:  # the holder has not heard its group from the coordinator yet
        return False
    return True


class _Stalled:
    """A peer service whose PutFragment takes the header and then reads nothing more, as a
    holder behind a black hole looks to the sender; it records how each call ended."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.release = threading.Event()

    def PutFragment(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutFragmentResponse:
        next(request_iterator)
        context.add_callback(self.ended.set)  # the client cancelled, or its deadline passed
        self.release.wait(30)
        return pb.PutFragmentResponse()


@pytest.fixture
def stalled_peer() -> Iterator[tuple[str, _Stalled]]:
    servicer = _Stalled()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=list(SERVER_OPTIONS))
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.PutFragment, request_deserializer=None, response_serializer=pb.PutFragmentResponse.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"PutFragment": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        servicer.release.set()
        server.stop(0).wait()


def big_header(size: int) -> FragmentHeader:
    return FragmentHeader(
        job="j", rank=0, step=1, generation=1, index=0, k=1, m=1, size_bytes=size, fragment_bytes=size, owner="node0", crc32c=0
    )


def test_a_put_to_a_peer_that_stops_reading_ends_at_its_deadline(stalled_peer: tuple[str, _Stalled]) -> None:
    address, servicer = stalled_peer
    data = memoryview(bytes(64 << 20))  # far more than the flow-control windows and socket buffers hold
    peers = PeerClient(token="", tls=TlsFiles())
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="DEADLINE_EXCEEDED"):
            peers.put_fragment(address, big_header(len(data)), data, timeout_s=1.0)
        assert time.monotonic() - started < 5
        assert servicer.ended.wait(5), "the peer saw the call end"
    finally:
        peers.close()


def test_a_cancelled_put_ends_at_once_and_reads_no_more_of_its_bytes(stalled_peer: tuple[str, _Stalled]) -> None:
    address, servicer = stalled_peer
    data = bytearray(64 << 20)
    peers = PeerClient(token="", tls=TlsFiles())
    try:
        call = peers.start_put(address, big_header(len(data)), memoryview(data), timeout_s=60)
        time.sleep(0.5)  # some chunks are in flight, the rest wait for the peer's window
        assert not call.done()
        started = time.monotonic()
        call.cancel()
        wait_until(call.done, 5, "the cancelled put to end")
        assert time.monotonic() - started < 2
        assert isinstance(call.error(), Unavailable)
        with pytest.raises(Unavailable):
            call.result()
        assert servicer.ended.wait(5)
    finally:
        peers.close()


def open_transfer(address: str, request: pb.OpenTransferRequest, token: str = TOKEN) -> pb.OpenTransferResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PeerServiceStub(channel).OpenTransfer(request, metadata=token_metadata(token), timeout=10)


def bulk_connection(address: str, port: int, ticket: bytes) -> socket.socket:
    conn = socket.create_connection((address.rsplit(":", 1)[0], port), timeout=10)
    conn.sendall(ticket)
    return conn


def closed_unanswered(conn: socket.socket) -> bool:
    """The peer closed the connection without sending a byte (reset, when our bytes were left unread)."""
    try:
        return conn.recv(16) == b""
    except ConnectionResetError:
        return True


def test_fragments_travel_on_the_bulk_channel_with_one_time_tickets_and_checksums(cluster: Cluster) -> None:
    """OpenTransfer checks a transfer as PutFragment/GetFragment would and hands out a ticket
    good for one connection; the bytes are checked against the fragment's crc32c; any other
    connection is closed unanswered."""
    addresses = cluster.addresses()
    frags = fragments()
    node1 = addresses["node1"]
    wait_until(lambda: when_placed(node1, lambda: put_messages(0, frags[0])) == grpc.StatusCode.OK, 15, "placement")

    opened = open_transfer(node1, pb.OpenTransferRequest(put=header(0, frags[0], step=6)))
    assert opened.port > 0 and len(opened.ticket) == bulk.TICKET_BYTES
    with bulk_connection(node1, opened.port, opened.ticket) as conn:
        conn.sendall(frags[0])
        bulk.read_verdict(conn, "put of step 6")  # raises unless stored
    assert get(node1, 0, step=6) == frags[0]

    # the same ticket again, or made-up bytes: the connection is closed without a word
    for ticket in (opened.ticket, bytes(bulk.TICKET_BYTES)):
        with bulk_connection(node1, opened.port, ticket) as conn:
            conn.sendall(frags[0][:1024])
            assert closed_unanswered(conn)

    # bytes damaged in transit (the header's crc32c says otherwise): refused, nothing of step 7 kept
    damaged = bytes([frags[0][0] ^ 0xFF]) + frags[0][1:]
    opened = open_transfer(node1, pb.OpenTransferRequest(put=header(0, frags[0], step=7)))
    with bulk_connection(node1, opened.port, opened.ticket) as conn:
        conn.sendall(damaged)
        with pytest.raises(CorruptSnapshot, match="crc32c"):
            bulk.read_verdict(conn, "put of step 7")
    assert status_of(lambda: get(node1, 0, step=7)) == grpc.StatusCode.NOT_FOUND

    # a transfer the coordinator did not place, an unknown fragment, no token: refused at OpenTransfer
    assert status_of(lambda: open_transfer(node1, pb.OpenTransferRequest(put=header(1, frags[1])))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    missing = pb.GetFragmentRequest(job="j", rank=0, fragment_index=0, step=99)
    assert status_of(lambda: open_transfer(node1, pb.OpenTransferRequest(get=missing))) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: open_transfer(node1, pb.OpenTransferRequest(get=missing), token="wrong")) == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    # a get: the header over gRPC, the raw bytes on the connection
    wanted = pb.GetFragmentRequest(job="j", rank=0, fragment_index=0, step=6)
    opened = open_transfer(node1, pb.OpenTransferRequest(get=wanted))
    assert (opened.header.step, opened.header.fragment_bytes) == (6, len(frags[0]))
    with bulk_connection(node1, opened.port, opened.ticket) as conn:
        assert bulk.recv_exact(conn, len(frags[0])) == frags[0]
        assert conn.recv(16) == b""

    # PeerClient takes the bulk channel both ways
    peers = PeerClient(token=TOKEN, tls=TlsFiles())
    try:
        newer = FragmentHeader(
            job="j", rank=0, step=8, generation=1, index=0, k=2, m=1, size_bytes=SCHEME.size_bytes,
            fragment_bytes=SCHEME.fragment_bytes, owner="node0", crc32c=crc32c.crc32c(frags[0]),
        )  # fmt: skip
        call = peers.start_put(node1, newer, memoryview(frags[0]))
        assert isinstance(call, BulkPutCall)
        call.result()
        got_header, got = peers.get_fragment(node1, "j", 0, 0, 8)
        assert bytes(got) == frags[0] and got_header.step == 8
    finally:
        peers.close()
    log = cluster.agents["node1"].log_path.read_text()
    assert "bulk channel listening" in log
    assert "unknown or expired ticket" in log


def test_an_agent_with_the_bulk_channel_off_is_reached_in_grpc_streams(cluster: Cluster) -> None:
    """--no-peer-bulk: OpenTransfer says UNIMPLEMENTED, and PeerClient puts and gets in gRPC streams instead."""
    restart_agent(cluster, "node1", "--no-peer-bulk")
    node1 = cluster.addresses()["node1"]
    frag = fragments()[0]
    request = pb.OpenTransferRequest(put=header(0, frag))
    assert status_of(lambda: open_transfer(node1, request)) == grpc.StatusCode.UNIMPLEMENTED
    peers = PeerClient(token=TOKEN, tls=TlsFiles())
    try:
        fragment_header = FragmentHeader(
            job="j", rank=0, step=5, generation=1, index=0, k=2, m=1, size_bytes=SCHEME.size_bytes,
            fragment_bytes=SCHEME.fragment_bytes, owner="node0", crc32c=crc32c.crc32c(frag),
        )  # fmt: skip
        wait_until(lambda: _stored(peers, node1, fragment_header, frag), 15, "node1 to hear its group", interval_s=0.2)
        assert bytes(peers.get_fragment(node1, "j", 0, 0, 5)[1]) == frag
    finally:
        peers.close()
    assert "bulk channel off (peer_bulk)" in cluster.agents["node1"].log_path.read_text()


def test_with_tls_the_bulk_channel_is_tls_too_and_asks_for_a_client_certificate(
    tmp_path: Path,
    shm_prefix: str,
    agent_factory,
    tls_files: TlsFiles,  # noqa: ANN001
) -> None:
    """Agents with mutual TLS: fragments still take the bulk channel, over TLS with the same
    certificates; a plaintext connection or one without a client certificate gets nothing."""
    tls_flags = ("--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), "--tls-ca", str(tls_files.ca))
    coordinator = CoordinatorProcess(
        workdir=tmp_path,
        extra_args=["--lease-s", "2", "--heartbeat-interval-s", "0.2", "--k", "2", "--m", "1", "--token", TOKEN, *tls_flags],
    ).start()
    base = shm_prefix.removesuffix(".")
    agents: dict[str, AgentProcess] = {}
    try:
        agents |= {
            node: agent_factory(
                name=node,
                extra_args=(
                    *("--node", node, "--coordinator", coordinator.address, "--token", TOKEN, "--domain", f"rack{i}"),
                    *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--shm-prefix", f"{base}-{node}."),
                    *tls_flags,
                ),
            )
            for i, node in enumerate(NODES[:4])
        }
        credentials = channel_credentials(tls_files)

        def addresses() -> dict[str, str]:
            with grpc.secure_channel(coordinator.address, credentials) as channel:
                status = cpb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
                    cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
                )
            return {a.agent.node: a.agent.address for a in status.agents if a.alive and a.group >= 0}

        wait_until(lambda: len(addresses()) == 4, 30, "four agents in a group over TLS")
        node1 = addresses()["node1"]
        frag = fragments()[0]
        fragment_header = FragmentHeader(
            job="j", rank=0, step=5, generation=1, index=0, k=2, m=1, size_bytes=SCHEME.size_bytes,
            fragment_bytes=SCHEME.fragment_bytes, owner="node0", crc32c=crc32c.crc32c(frag),
        )  # fmt: skip
        peers = PeerClient(token=TOKEN, tls=tls_files)
        try:
            wait_until(lambda: _stored(peers, node1, fragment_header, frag), 15, "node1 to hear its group", interval_s=0.2)
            call = peers.start_put(node1, replace(fragment_header, step=6), memoryview(frag))
            assert isinstance(call, BulkPutCall)
            call.result()
            assert bytes(peers.get_fragment(node1, "j", 0, 0, 6)[1]) == frag
        finally:
            peers.close()
        log = agents["node1"].log_path.read_text()
        assert "bulk channel listening" in log and "(TLS)" in log
        assert "bulk channel of" not in log, "no fallback to gRPC streams"

        wanted = pb.OpenTransferRequest(get=pb.GetFragmentRequest(job="j", rank=0, fragment_index=0, step=6))
        for context in (None, ssl.create_default_context(cafile=str(tls_files.ca))):  # plaintext; TLS without a certificate
            with grpc.secure_channel(node1, credentials) as channel:
                opened = pb_grpc.PeerServiceStub(channel).OpenTransfer(wanted, metadata=token_metadata(TOKEN), timeout=10)
            with socket.create_connection(("127.0.0.1", opened.port), timeout=10) as plain:
                try:
                    conn = context.wrap_socket(plain, server_hostname="127.0.0.1") if context is not None else plain
                    conn.sendall(opened.ticket)
                    got = conn.recv(16)
                except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                    got = b""
                assert got == b"", "nothing is served without mutual TLS"
        wait_until(lambda: agents["node1"].log_path.read_text().count("TLS handshake failed") >= 2, 10, "both refusals logged")
    finally:
        codes = [agent.stop() for agent in agents.values()]  # on-exit remove: their fragments go
        assert coordinator.stop() == 0, f"see {coordinator.log_path}"
        leftovers = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(f"{base}-"))
        for name in leftovers:
            (DEFAULT_ROOT / name).unlink(missing_ok=True)
        assert not leftovers and all(code == 0 for code in codes), (leftovers, codes)
