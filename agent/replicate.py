"""Protection: each new commit is erasure-coded and its k+m fragments sent to the group.

One background thread, never on the trainer's path. It works on the step the coordinator
aligns the job's ranks on (see coordinator/protection.py), or, while the coordinator is
unreachable, on each rank's newest commit: when peers are slower than snapshots it skips
the steps in between instead of queueing them. While a slot is read it is pinned, so the
trainer's next snapshot skips (counted, training goes on) rather than overwrite bytes being sent.
"""

from __future__ import annotations

import logging
import threading
import time

import crc32c

from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.erasure import Scheme, data_fragment, encode_parity
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.peers import PeerClient
from memckpt.agent.store import ProtectionWork, SlotStore
from memckpt.coordinator.groups import choose_fragment_holders

log = logging.getLogger(__name__)

IDLE_S = 0.2


class Replicator:
    def __init__(self, *, store: SlotStore, link: CoordinatorLink, peers: PeerClient, node: str) -> None:
        self._store = store
        self._link = link
        self._peers = peers
        self._node = node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replicator", daemon=True)
        self._failing: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._peers.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            progressed = False
            for work in self._store.protection_work(self._link.target):  # the coordinator's aligned step
                try:
                    progressed |= self._protect(work)
                except Exception as exc:  # a peer down or slow: log once per kind, retry later
                    kind = type(exc).__name__
                    if kind not in self._failing:
                        log.warning("protecting %s step=%d failed (%s): %s; will retry", work.key, work.step, kind, exc)
                    self._failing.add(kind)
                    self._stop.wait(1.0)
            if not progressed:
                self._stop.wait(IDLE_S)

    def _protect(self, work: ProtectionWork) -> bool:
        group, k, m = self._link.group, self._link.k, self._link.m
        nodes = tuple(a.node for a in group)
        if k < 1 or self._node not in nodes or len(nodes) < k + m + 1:
            return False  # no group yet: nothing to protect with
        addresses = {a.node: a.address for a in group}
        holders = choose_fragment_holders(self._node, nodes, k + m)
        view = self._store.pin(work)
        if view is None:
            return False  # superseded meanwhile
        started = time.perf_counter()
        try:
            scheme = Scheme(k=k, m=m, size_bytes=work.size_bytes)
            meta = work.meta.decode()  # the client's JSON
            fragments = [data_fragment(view, scheme, i) for i in range(k)] + list(encode_parity(view, scheme))
            for index, (holder, fragment) in enumerate(zip(holders, fragments)):
                data = memoryview(fragment)
                header = FragmentHeader(
                    job=work.key.job,
                    rank=work.key.rank,
                    step=work.step,
                    generation=work.generation,
                    index=index,
                    k=k,
                    m=m,
                    size_bytes=work.size_bytes,
                    fragment_bytes=scheme.fragment_bytes,
                    owner=self._node,
                    crc32c=int(crc32c.crc32c(data)),
                    meta=meta,
                    meta_crc32c=int(crc32c.crc32c(work.meta)),
                    snapshot_checksums=work.checksums,
                )
                self._peers.put_fragment(addresses[holder], header, data)
            del fragments, data
        finally:
            view.release()
            self._store.unpin(work)
        if self._store.mark_protected(work):
            self._failing.clear()
            log.info(
                "protected %s step=%d k=%d m=%d holders=%s s=%.3f",
                work.key,
                work.step,
                k,
                m,
                list(holders),
                time.perf_counter() - started,
            )
        return True
