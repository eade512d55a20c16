"""The replicator's sending logic over fakes: puts go out in parallel, a new group cancels them and
unpins the slot at once, a failing holder is logged once and only its fragment is sent again, and
a commit protected with a holder that is now drained is protected again without it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.peers import PUT_BASE_S, PUT_TIMEOUT_S, PeerClient, put_timeout_s
from memckpt.agent.replicate import Replicator
from memckpt.agent.slots import RankKey, Slot
from memckpt.agent.store import ProtectionWork, SlotStore
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.coordinator.membership import AgentInfo
from memckpt.errors import MemckptError, StaleGeneration, Unavailable

SNAPSHOT = bytes(range(256)) * 40
WORK = ProtectionWork(
    key=RankKey(job="j", rank=0),
    index=0,
    commit_id=1,
    step=7,
    size_bytes=len(SNAPSHOT),
    meta=b"{}",
    generation=1,
    checksums=(),
)


def group_of(*nodes: str) -> tuple[AgentInfo, ...]:
    return tuple(AgentInfo(node=n, address=f"{n}:1", capacity_bytes=1 << 30, domain=f"rack-{n}") for n in nodes)


@dataclass
class FakeStore:
    """One commit to protect until it is marked protected; records pins and who protected it."""

    pinned: int = 0
    unpinned_at: list[float] = field(default_factory=list)
    protected: threading.Event = field(default_factory=threading.Event)
    protected_by: tuple[str, ...] = ()
    protections: list[tuple[str, ...]] = field(default_factory=list)

    def protection_work(self, targets: Callable[[str, int], int | None]) -> list[ProtectionWork]:
        return [] if self.protected.is_set() else [WORK]

    def pin(self, work: ProtectionWork) -> memoryview:
        self.pinned += 1
        return memoryview(bytearray(SNAPSHOT))

    def unpin(self, work: ProtectionWork) -> None:
        self.pinned -= 1
        self.unpinned_at.append(time.monotonic())

    def mark_protected(self, work: ProtectionWork, holders: tuple[str, ...] = ()) -> bool:
        self.protected_by = holders
        self.protections.append(holders)
        self.protected.set()
        return True

    def unprotect_unless_held_by(self, valid: frozenset[str]) -> list[tuple[RankKey, Slot]]:
        if not self.protected.is_set() or valid.issuperset(self.protected_by):
            return []
        was = Slot(index=0, version=0, size_bytes=len(SNAPSHOT), step=WORK.step, protected=True, protected_by=self.protected_by)
        self.protected_by = ()
        self.protected.clear()
        return [(WORK.key, was)]


@dataclass
class FakeLink:
    group: tuple[AgentInfo, ...]
    k: int = 2
    m: int = 1
    draining: frozenset[str] = frozenset()

    def target(self, job: str, generation: int) -> int | None:
        return None

    def kept_version(self, job: str) -> tuple[int, int] | None:
        return (1, 6)


class FakeCall:
    """A put the test ends: `finish(error)`; a cancel ends it as Unavailable."""

    def __init__(self, address: str, header: FragmentHeader) -> None:
        self.address, self.header = address, header
        self.cancelled = False
        self._error: MemckptError | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[], object]] = []
        self._lock = threading.Lock()

    def finish(self, error: MemckptError | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        self.cancelled = True
        self.finish(Unavailable("cancelled"))

    def error(self) -> MemckptError | None:
        return self._error


@dataclass
class FakePeers:
    """Each holder (by address) answers as `answers` says: 'ok' at once, 'hang' never, or an error to raise."""

    answers: dict[str, Any] = field(default_factory=dict)
    calls: list[FakeCall] = field(default_factory=list)
    started: threading.Condition = field(default_factory=threading.Condition)

    def start_put(self, address: str, header: FragmentHeader, data: memoryview, *, timeout_s: float) -> FakeCall:
        call = FakeCall(address, header)
        with self.started:
            self.calls.append(call)
            self.started.notify_all()
        answer = self.answers.get(address, "ok")
        if answer == "ok":
            call.finish()
        elif isinstance(answer, list) and answer:
            call.finish(answer.pop(0))  # a list: the errors of the first tries, then ok
        elif isinstance(answer, list):
            call.finish()
        return call

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[FakeCall]:
        with self.started:
            assert self.started.wait_for(lambda: len(self.calls) >= count, timeout_s), f"{len(self.calls)} puts started"
            return list(self.calls)

    def close(self) -> None:
        pass


def replicator(store: FakeStore, link: FakeLink, peers: FakePeers, retry_s: float = 1.0) -> Replicator:
    return Replicator(
        store=cast(SlotStore, store),
        link=cast(CoordinatorLink, link),
        peers=cast(PeerClient, peers),
        node="a",
        retry_s=retry_s,
    )


def test_puts_go_out_together_and_a_new_group_cancels_them_and_unpins_the_slot() -> None:
    old, new = group_of("a", "b", "c", "d"), group_of("a", "c", "d", "e")
    store, link = FakeStore(), FakeLink(group=old)
    peers = FakePeers(answers={"b:1": "hang", "c:1": "hang", "d:1": "hang"})  # b is cut: nothing ever comes back
    rep = replicator(store, link, peers)
    rep.start()
    try:
        first = peers.wait_for(3)  # all three in flight at once, none done
        assert sorted(c.address for c in first) == ["b:1", "c:1", "d:1"] and not any(c.done() for c in first)
        assert store.pinned == 1
        peers.answers = {"b:1": "hang"}  # c and d answer the next puts
        changed_at = time.monotonic()
        link.group = new
        assert store.protected.wait(5), "the new group protects the step"
        assert all(c.cancelled for c in first), "every put to the old group was abandoned"
        assert store.unpinned_at[0] - changed_at < 0.5 and store.pinned == 0
        resent = peers.calls[3:]
        holders = choose_fragment_holders("a", tuple(a.node for a in new), 3)
        assert {c.header.index: c.address for c in resent} == {i: f"{h}:1" for i, h in enumerate(holders)}
    finally:
        rep.stop()


def test_a_commit_protected_on_a_node_now_drained_is_protected_again_without_it() -> None:
    store, link = FakeStore(), FakeLink(group=group_of("a", "b", "c", "d", "e"))
    peers = FakePeers()
    rep = replicator(store, link, peers)
    rep.start()
    try:
        wait = lambda count: wait_for(lambda: len(store.protections) >= count)  # noqa: E731
        wait(1)
        assert store.protections == [("b", "c", "d")]
        link.draining = frozenset({"c"})  # the job stands still: the same commit is sent again
        wait(2)
        assert store.protections[1] == ("b", "e", "d"), "only c's fragment moves; b and d keep their indices"
        resent = peers.calls[3:]
        assert {c.header.index: c.address for c in resent} == {0: "b:1", 1: "e:1", 2: "d:1"}
        assert all(c.header.kept == (1, 6) for c in resent), "holders hear the job's kept step with each fragment"
        link.draining = frozenset({"a"})  # the owner itself drained: its holders stay valid, nothing is sent
        time.sleep(0.5)
        assert len(store.protections) == 2 and len(peers.calls) == 6
    finally:
        rep.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_refusing_holder_is_logged_once_and_only_its_fragment_is_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    store, link = FakeStore(), FakeLink(group=group_of("a", "b", "c", "d"))
    refusal = [StaleGeneration("c does not know the group yet") for _ in range(3)]
    peers = FakePeers(answers={"c:1": refusal})
    rep = replicator(store, link, peers, retry_s=0.01)
    with caplog.at_level(logging.WARNING, logger="memckpt.agent.replicate"):
        rep.start()
        try:
            assert store.protected.wait(5)
        finally:
            rep.stop()
    assert [c.address for c in peers.calls].count("c:1") == 4  # three refusals, then stored
    assert [c.address for c in peers.calls].count("b:1") == 1 and [c.address for c in peers.calls].count("d:1") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "holder=c" in warnings[0] and "StaleGeneration" in warnings[0], warnings


def test_stop_cancels_the_puts_in_flight() -> None:
    store, link = FakeStore(), FakeLink(group=group_of("a", "b", "c", "d"))
    peers = FakePeers(answers={"b:1": "hang"})
    rep = replicator(store, link, peers)
    rep.start()
    calls = peers.wait_for(3)
    started = time.monotonic()
    rep.stop()
    assert time.monotonic() - started < 1.0
    assert [c.cancelled for c in calls if c.address == "b:1"] == [True] and store.pinned == 0
    assert not store.protected.is_set()


def test_a_put_deadline_grows_with_the_fragment_and_has_a_ceiling() -> None:
    assert put_timeout_s(0) == PUT_BASE_S
    assert put_timeout_s(512 << 20, 32 << 20) == pytest.approx(PUT_BASE_S + 16)
    assert put_timeout_s(1 << 40, 32 << 20) == PUT_TIMEOUT_S
    for bad in ((-1, 1.0), (1, 0.0)):
        with pytest.raises(ValueError):
            put_timeout_s(*bad)
