"""Protection: each new commit is erasure-coded and its k+m fragments sent to the group.

One background thread, never on the trainer's path. It works on the step the coordinator
aligns the job's ranks on (see coordinator/protection.py), or, while the coordinator is
unreachable, on each rank's newest commit: when peers are slower than snapshots it skips
the steps in between instead of queueing them. While a slot is read it is pinned, so the
trainer's next snapshot skips (counted, training goes on) rather than overwrite bytes being sent.
A protected commit with a fragment on a node that may no longer hold it (one being drained, or
gone from the group) is protected again, with the holders of now: also when the job stands still.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import crc32c

from memckpt.agent import metrics
from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.erasure import Scheme, data_fragment, encode_parity
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.pacing import Throttle
from memckpt.agent.peers import DEFAULT_PUT_MIN_RATE_BYTES_PER_S, PeerClient, PutCall, put_timeout_s
from memckpt.agent.slots import RankKey
from memckpt.agent.store import ProtectionWork, SlotStore
from memckpt.coordinator.groups import can_hold, choose_fragment_holders
from memckpt.coordinator.membership import AgentInfo
from memckpt.errors import MemckptError, PermissionDenied, StaleGeneration

log = logging.getLogger(__name__)

IDLE_S = 0.2
RETRY_S = 1.0
WATCH_S = 0.05  # how often the puts of a step look for a new group or a stop


class PutFailed(Exception):
    """A holder did not store its fragment: refused it, failed, or missed the put's deadline."""

    def __init__(self, holder: str, cause: MemckptError) -> None:
        super().__init__(f"holder {holder}: {cause}")
        self.holder = holder
        self.cause = cause


@dataclass(frozen=True, slots=True, kw_only=True)
class _Put:
    index: int
    holder: str
    address: str


class Replicator:
    """Call order: `start()`, then `stop()` (which cancels the puts in flight and closes `peers`)."""

    def __init__(
        self,
        *,
        store: SlotStore,
        link: CoordinatorLink,
        peers: PeerClient,
        node: str,
        put_min_rate_bytes_per_s: float = DEFAULT_PUT_MIN_RATE_BYTES_PER_S,
        throttle: Throttle | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        self._store = store
        self._link = link
        self._peers = peers
        self._node = node
        self._put_min_rate_bytes_per_s = put_min_rate_bytes_per_s
        self._retry_s = retry_s
        self._throttle = throttle  # None: no pace to keep (see pacing.py)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replicator", daemon=True)
        self._failing: set[tuple[str, str]] = set()  # (holder, kind) logged since the last protected step
        # per rank: the commit being sent (its commit id, step, generation, k, m), and the puts acknowledged
        self._acked: dict[RankKey, tuple[tuple[int, ...], set[_Put]]] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._peers.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._throttle is not None:
                self._throttle.rest(self._stop)  # pays for the last step now, before the next target is committed
            progressed = False
            self._unprotect_moved()
            works = self._store.protection_work(self._link.target)  # the coordinator's aligned step
            for key in self._acked.keys() - {w.key for w in works}:
                del self._acked[key]  # protected meanwhile, or the rank is gone
            for work in works:
                if self._stop.is_set():
                    break
                if self._throttle is not None and self._throttle.rest(self._stop):
                    progressed = True
                    break  # rested (after another rank's step): look again, so that the step protected is the newest
                try:
                    progressed |= self._protect(work)
                except Exception as exc:  # a peer down, slow or refusing: log once per holder and kind, retry later
                    metrics.PROTECT_FAILURES.inc()
                    holder, cause = (exc.holder, exc.cause) if isinstance(exc, PutFailed) else ("-", exc)
                    kind = type(cause).__name__
                    if (holder, kind) not in self._failing:
                        log.warning(
                            "protecting %s step=%d failed: holder=%s %s: %s; will retry", work.key, work.step, holder, kind, cause
                        )
                    self._failing.add((holder, kind))
                    # a holder whose view of the group lags ours hears the new one with its next heartbeat
                    lagging = isinstance(cause, (StaleGeneration, PermissionDenied))
                    self._stop.wait(IDLE_S if lagging else self._retry_s)
            if not progressed:
                self._stop.wait(IDLE_S)

    def _unprotect_moved(self) -> None:
        """Protected commits with a fragment on a node that may hold none of ours now (draining,
        or no longer in the group) become unprotected: the loop protects them again elsewhere."""
        group, draining, k, m = self._view()
        nodes = tuple(a.node for a in group)
        if k < 1 or not can_hold(self._node, nodes, k + m, draining):
            return  # no usable group: nothing to protect with, so nothing is unprotected either
        valid = frozenset(nodes) - draining - {self._node}
        for key, slot in self._store.unprotect_unless_held_by(valid):
            gone = sorted(set(slot.protected_by) - valid)
            log.info("%s step=%d: holder(s) %s drained or gone from the group; protecting it again", key, slot.step, gone)

    def _view(self) -> tuple[tuple[AgentInfo, ...], frozenset[str], int, int]:
        """The coordinator's latest word on this node's group: members, who of them is drained, k, m."""
        return self._link.group, self._link.draining, self._link.k, self._link.m

    def _protect(self, work: ProtectionWork) -> bool:
        group_view = self._view()
        group, draining, k, m = group_view
        nodes = tuple(a.node for a in group)
        if k < 1 or not can_hold(self._node, nodes, k + m, draining):
            return False  # no group yet: nothing to protect with
        addresses = {a.node: a.address for a in group}
        holders = choose_fragment_holders(self._node, nodes, k + m, draining)
        puts = [_Put(index=i, holder=h, address=addresses[h]) for i, h in enumerate(holders)]
        view = self._store.pin(work)
        if view is None:
            return False  # superseded meanwhile
        started = time.perf_counter()
        try:
            scheme = Scheme(k=k, m=m, size_bytes=work.size_bytes)
            with metrics.ENCODE_SECONDS.time():
                fragments = [data_fragment(view, scheme, i) for i in range(k)] + list(encode_parity(view, scheme))
            sent = self._send(work, group_view, puts, [memoryview(f) for f in fragments], scheme)
            if self._throttle is not None:
                self._throttle.sent(len(puts) * scheme.fragment_bytes)
            del fragments
        finally:
            view.release()
            self._store.unpin(work)  # at once, also when the puts were abandoned: the trainer's next snapshot may go on
        if not sent:
            return True  # the group changed (or we stop): the next round sends to the new one, the newest step
        self._acked.pop(work.key, None)
        metrics.FRAGMENT_SENT_BYTES.inc(len(puts) * scheme.fragment_bytes)
        if self._store.mark_protected(work, holders):
            metrics.PROTECTIONS.labels(work.key.job).inc()
            metrics.PROTECTED_STEP.labels(work.key.job, str(work.key.rank)).set(work.step)
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

    def _send(
        self,
        work: ProtectionWork,
        view_of_group: tuple[tuple[AgentInfo, ...], frozenset[str], int, int],
        puts: list[_Put],
        fragments: list[memoryview],
        scheme: Scheme,
    ) -> bool:
        """Sends each fragment to its holder, all at once; True when every one is acknowledged.

        False when the coordinator's group changes meanwhile or the replicator stops: the puts
        in flight are cancelled. Raises PutFailed (the first failure) when every put has ended
        and one failed; the acknowledged ones are not sent again while the commit is the same.
        """
        acked = self._acked_puts(work, scheme)
        wake = threading.Event()
        calls: dict[_Put, PutCall] = {}
        failures: list[PutFailed] = []
        try:
            for put in puts:
                if put not in acked:
                    calls[put] = self._start_put(work, put, fragments[put.index], scheme)
                    calls[put].add_done_callback(wake.set)
            while calls:
                wake.clear()
                for put, call in [(p, c) for p, c in calls.items() if c.done()]:
                    del calls[put]
                    error = call.error()
                    if error is None:
                        acked.add(put)
                    else:
                        failures.append(PutFailed(put.holder, error))
                if calls and (self._stop.is_set() or self._view() != view_of_group):
                    why = "stopping" if self._stop.is_set() else "the protection group changed"
                    log.info(
                        "protecting %s step=%d: %s; abandoning the puts in flight to %s",
                        work.key,
                        work.step,
                        why,
                        sorted(p.holder for p in calls),
                    )
                    return False
                wake.wait(WATCH_S)
        finally:
            for call in calls.values():
                call.cancel()
        if failures:
            raise failures[0]
        return True

    def _start_put(self, work: ProtectionWork, put: _Put, data: memoryview, scheme: Scheme) -> PutCall:
        kept = self._link.kept_version(work.key.job)  # told to the holder, which may not have heard it yet
        header = FragmentHeader(
            job=work.key.job,
            rank=work.key.rank,
            step=work.step,
            generation=work.generation,
            index=put.index,
            k=scheme.k,
            m=scheme.m,
            size_bytes=work.size_bytes,
            fragment_bytes=scheme.fragment_bytes,
            owner=self._node,
            crc32c=int(crc32c.crc32c(data)),
            meta=work.meta.decode(),  # the client's JSON
            meta_crc32c=int(crc32c.crc32c(work.meta)),
            snapshot_checksums=work.checksums,
            kept_step=kept[1] if kept is not None else -1,
            kept_generation=kept[0] if kept is not None else 0,
        )
        timeout_s = put_timeout_s(scheme.fragment_bytes, self._put_min_rate_bytes_per_s)
        return self._peers.start_put(put.address, header, data, timeout_s=timeout_s)

    def _acked_puts(self, work: ProtectionWork, scheme: Scheme) -> set[_Put]:
        """The puts of this very commit (and scheme) acknowledged by earlier tries."""
        commit = (work.commit_id, work.step, work.generation, scheme.k, scheme.m)
        known = self._acked.get(work.key)
        if known is None or known[0] != commit:
            known = self._acked[work.key] = (commit, set())
        return known[1]
