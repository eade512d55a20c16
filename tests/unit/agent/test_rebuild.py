"""Rebuilding a rank from fragments into a slot: install, commit, abort, and RemoteRestore's use of them.

The slot store runs over a ShmDir in a temporary directory; peers and the coordinator are fakes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import crc32c
import pytest

from memckpt.agent.checksum import chunk_checksums
from memckpt.agent.erasure import Scheme, data_fragment, encode_parity
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.peers import WriteAt
from memckpt.agent.recover import RemoteRestore
from memckpt.agent.shm import ShmDir
from memckpt.agent.slots import MemoryBudget
from memckpt.agent.store import SlotStore
from memckpt.errors import CorruptSnapshot, InvalidRequest, NotFound, Unavailable
from memckpt.protos import coordinator_pb2 as cpb

META = b'{"tensors": []}'
BUDGET_BYTES = 64 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlotStore]:
    store = SlotStore(shm=ShmDir(tmp_path), prefix="t.", budget=MemoryBudget(limit_bytes=BUDGET_BYTES))
    store.start()
    yield store
    store.stop(remove=True)


def owner_checksums(data: bytes) -> tuple[int, ...]:
    checksums = chunk_checksums(memoryview(data), len(data), META)
    assert checksums is not None
    return checksums


def segment_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".manifest"))


def test_an_install_commits_the_written_bytes_with_the_owners_checksums(store: SlotStore, tmp_path: Path) -> None:
    data = os.urandom(3_000_001)
    target = store.begin_install("j", 2, 7, len(data) + 1)  # padded, as a rebuild's slot is
    for start in range(0, len(data), 1 << 20):
        target.writer.write_at(start, data[start : start + (1 << 20)])
    store.commit_install(target, len(data), META, owner_checksums(data))
    source = store.open_restore("j", 2, 7)  # verifies the slot against the owner's checksums
    assert (source.step, source.data_size_bytes, source.meta) == (7, len(data), META)
    assert (tmp_path / source.name).read_bytes()[: len(data)] == data
    assert segment_names(tmp_path) == [source.name], "only the rebuilt slot has memory until the rank registers"
    store.register("j", 2, 4, len(data) + 1)  # the rank's client: its other slot is allocated now
    assert len(segment_names(tmp_path)) == 2
    assert store.open_restore("j", 2, 7).step == 7


def test_a_rebuild_that_differs_from_the_owners_bytes_is_never_restored(store: SlotStore) -> None:
    data = os.urandom(1 << 20)
    target = store.begin_install("j", 0, 3, len(data))
    target.writer.write_at(0, data)
    wrong = bytearray(data)
    wrong[12345] ^= 1
    store.commit_install(target, len(data), META, owner_checksums(bytes(wrong)))
    with pytest.raises(CorruptSnapshot, match="job 'j' rank 0 step 3: checksum mismatch"):
        store.open_restore("j", 0, 3)


def test_an_aborted_install_of_a_new_rank_leaves_no_slot_and_frees_its_budget(store: SlotStore, tmp_path: Path) -> None:
    target = store.begin_install("j", 1, 5, 1 << 20)
    target.writer.write_at(0, b"partial")
    store.abort_install(target)
    assert segment_names(tmp_path) == []
    assert store.memory_used_bytes() == 0
    with pytest.raises(NotFound):
        store.open_restore("j", 1, 5)
    again = store.begin_install("j", 1, 5, 1 << 20)  # a retry of the same step is accepted
    again.writer.write_at(0, bytes(1 << 20))
    store.commit_install(again, 1 << 20, META, owner_checksums(bytes(1 << 20)))
    assert store.open_restore("j", 1, 5).step == 5


def test_an_aborted_install_keeps_the_ranks_committed_snapshot(store: SlotStore) -> None:
    data = os.urandom(1 << 16)
    store.register("j", 0, 1, len(data))
    grant = store.begin("j", 0, 9, len(data))
    writer = ShmDir(store._shm.root).open_writer(grant.name)
    writer.write_at(0, data)
    writer.close()
    store.commit("j", 0, 9, grant.index, len(data), META)
    target = store.begin_install("j", 0, 4, len(data))  # an older step that only peers hold
    store.abort_install(target)
    assert [step for step, _ in store.list_steps("j", 0)] == [9]
    assert store.open_restore("j", 0, 9).step == 9


def test_a_segment_writer_refuses_writes_past_the_segment(tmp_path: Path) -> None:
    shm = ShmDir(tmp_path)
    shm.create_segment("s", 100).close()
    writer = shm.open_writer("s")
    writer.write_at(90, b"x" * 10)
    with pytest.raises(InvalidRequest, match="runs outside segment s"):
        writer.write_at(91, b"x" * 10)
    writer.close()
    with pytest.raises(NotFound):
        shm.open_writer("missing")


# -- RemoteRestore over fake peers ---------------------------------------------------------


class FakeLink:
    def __init__(self, location: cpb.SnapshotLocation) -> None:
        self.location = location

    def locate(self, job: str, rank: int) -> cpb.LocateSnapshotsResponse:
        return cpb.LocateSnapshotsResponse(locations=[self.location])


class FakePeers:
    """Serves the fragments of `data`; holders named in `corrupt` flip a byte, those in `dead` fail."""

    def __init__(self, data: bytes, scheme: Scheme, corrupt: set[int], dead: set[int]) -> None:
        self.scheme = scheme
        view = memoryview(data)
        self.fragments = [bytes(data_fragment(view, scheme, i)) for i in range(scheme.k)]
        self.fragments += [bytes(p) for p in encode_parity(view, scheme)]
        self.checksums = owner_checksums(data)
        self.corrupt, self.dead = corrupt, dead
        self.served: list[int] = []
        self.hands_out_tickets = True
        self.stale: set[int] = set()  # holders of another attempt's fragment

    def _header(self, index: int) -> FragmentHeader:
        return FragmentHeader(
            job="j",
            rank=0,
            step=6,
            generation=1,
            index=index,
            k=self.scheme.k,
            m=self.scheme.m,
            size_bytes=self.scheme.size_bytes,
            fragment_bytes=self.scheme.fragment_bytes,
            owner="node0",
            crc32c=int(crc32c.crc32c(self.fragments[index])),
            meta=META.decode(),
            meta_crc32c=int(crc32c.crc32c(META)),
            snapshot_checksums=self.checksums,
        )

    def receive_fragment(
        self, address: str, job: str, rank: int, index: int, step: int, open_sink: Callable[[FragmentHeader], WriteAt]
    ) -> FragmentHeader:
        self.served.append(index)
        if index in self.dead:
            raise Unavailable(f"holder of fragment {index} is gone")
        header = self._header(index)
        write_at = open_sink(header)
        payload = bytearray(self.fragments[index])
        if index in self.corrupt:  # the bytes arrive damaged, as a real client finds by crc
            payload[len(payload) // 2] ^= 0xFF
            write_at(0, payload)
            raise CorruptSnapshot(f"fragment {index}: chunk crc mismatch")
        write_at(0, payload)
        return header

    def get_ticket(
        self, address: str, job: str, rank: int, index: int, step: int
    ) -> tuple[FragmentHeader, str, int, bytes] | None:
        if index in self.dead:
            raise Unavailable(f"holder of fragment {index} is gone")
        header = self._header(index)
        if index in self.stale:
            header = dataclasses.replace(header, generation=header.generation + 1)
        return header, f"host{index}", 7500 + index, bytes([index]) * 32

    def get_fragment(
        self, address: str, job: str, rank: int, index: int, step: int, into: memoryview | None = None
    ) -> tuple[FragmentHeader, memoryview]:
        buffer: bytearray = bytearray()

        def open_sink(header: FragmentHeader) -> WriteAt:
            nonlocal buffer
            buffer = bytearray(header.fragment_bytes)
            return lambda offset, data: buffer.__setitem__(slice(offset, offset + len(data)), data)

        return self.receive_fragment(address, job, rank, index, step, open_sink), memoryview(buffer)


def location(scheme: Scheme) -> cpb.SnapshotLocation:
    holders = [cpb.FragmentHolder(index=i, node=f"node{i + 1}", address=f"a{i}") for i in range(scheme.k + scheme.m)]
    return cpb.SnapshotLocation(step=6, generation=1, fragments=holders, k=scheme.k, m=scheme.m, size_bytes=scheme.size_bytes)


@pytest.mark.parametrize(("k", "m", "corrupt", "dead"), [(2, 1, set(), set()), (2, 1, {0}, set()), (4, 2, {1}, {3})])
def test_a_rank_is_rebuilt_into_a_slot_around_corrupt_and_dead_holders(
    store: SlotStore, k: int, m: int, corrupt: set[int], dead: set[int]
) -> None:
    data = os.urandom(1_000_003)
    scheme = Scheme(k=k, m=m, size_bytes=len(data))
    peers = FakePeers(data, scheme, corrupt, dead)
    remote = RemoteRestore(link=FakeLink(location(scheme)), peers=peers, store=store)  # type: ignore[arg-type]
    remote.fetch("j", 0, 6)
    source = store.open_restore("j", 0, 6)
    assert (Path(store._shm.root) / source.name).read_bytes()[: len(data)] == data
    assert source.checksums == peers.checksums
    assert set(peers.served) >= corrupt | dead and len(set(peers.served)) == k + len(corrupt | dead)


def test_a_rebuild_without_k_good_fragments_leaves_no_slot(store: SlotStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    peers = FakePeers(data, scheme, corrupt={0}, dead={2})
    remote = RemoteRestore(link=FakeLink(location(scheme)), peers=peers, store=store)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="only 1 of 2 fragments"):
        remote.fetch("j", 0, 6)
    assert segment_names(tmp_path) == []
    assert store.memory_used_bytes() == 0
    with pytest.raises(NotFound):
        store.open_restore("j", 0, 6)


def test_a_direct_plan_names_a_ticket_on_each_data_fragments_holder_and_allocates_nothing(
    store: SlotStore, tmp_path: Path
) -> None:
    data = os.urandom(1_000_003)
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    peers = FakePeers(data, scheme, corrupt=set(), dead=set())
    remote = RemoteRestore(link=FakeLink(location(scheme)), peers=peers, store=store)  # type: ignore[arg-type]
    plan = remote.plan_direct("j", 0, 6)
    assert plan is not None
    assert (plan.step, plan.data_size_bytes, plan.fragment_bytes) == (6, len(data), scheme.fragment_bytes)
    assert (plan.meta, plan.checksums) == (META, peers.checksums)
    assert [(f.index, f.node, f.host, f.port, f.ticket) for f in plan.fragments] == [
        (0, "node1", "host0", 7500, bytes(32)),
        (1, "node2", "host1", 7501, bytes([1]) * 32),
    ]
    assert segment_names(tmp_path) == [] and store.memory_used_bytes() == 0


@pytest.mark.parametrize("why", ["a data holder is gone", "a holder has another attempt", "TLS between agents"])
def test_no_direct_plan_when_the_data_fragments_cannot_all_be_fetched_as_they_are(store: SlotStore, why: str) -> None:
    data = os.urandom(100_000)
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    peers = FakePeers(data, scheme, corrupt=set(), dead={1} if why == "a data holder is gone" else set())
    peers.stale = {0} if why == "a holder has another attempt" else set()
    peers.hands_out_tickets = why != "TLS between agents"
    remote = RemoteRestore(link=FakeLink(location(scheme)), peers=peers, store=store)  # type: ignore[arg-type]
    assert remote.plan_direct("j", 0, 6) is None
    remote.fetch("j", 0, 6)  # the agent rebuilds it itself, around the holder that cannot serve
    assert store.open_restore("j", 0, 6).checksums == peers.checksums


def test_no_direct_plan_when_only_parity_is_left_of_a_data_fragment(store: SlotStore) -> None:
    data = os.urandom(100_000)
    scheme = Scheme(k=2, m=1, size_bytes=len(data))
    peers = FakePeers(data, scheme, corrupt=set(), dead=set())
    where = location(scheme)
    del where.fragments[0]  # its holder failed: the coordinator no longer names it
    remote = RemoteRestore(link=FakeLink(where), peers=peers, store=store)  # type: ignore[arg-type]
    assert remote.plan_direct("j", 0, 6) is None
    with pytest.raises(NotFound):
        remote.plan_direct("j", 0, 5)
