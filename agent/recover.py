"""Restore anywhere: bring a rank's snapshot that this agent does not hold from its peers.

The coordinator says where the rank's fragments live; any k of them, each checked by
crc, are decoded here and installed as a committed local slot, so the normal restore
path (checksum verification, copy into the trainer's tensors) takes over unchanged.
"""

from __future__ import annotations

import logging
import time

import grpc

from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.erasure import Scheme, decode
from memckpt.agent.peers import PeerClient
from memckpt.agent.store import SlotStore
from memckpt.errors import CorruptSnapshot, MemckptError, NotFound, Unavailable
from memckpt.protos import coordinator_pb2 as pb

log = logging.getLogger(__name__)


class RemoteRestore:
    def __init__(self, *, link: CoordinatorLink, peers: PeerClient, store: SlotStore) -> None:
        self._link = link
        self._peers = peers
        self._store = store

    def steps(self, job: str, rank: int) -> list[int]:
        """Steps of the rank that enough live peers can rebuild; [] if the coordinator is away.

        Raises:
            CorruptSnapshot: the rank had snapshots, but too many of their holders failed:
                memory cannot restore it (DATA_LOSS), and the job must not start over silently.
        """
        try:
            reply = self._link.locate(job, rank)
        except grpc.RpcError as exc:
            log.warning("cannot ask the coordinator where job=%s rank=%d is (%s)", job, rank, exc.code().name)
            return []
        if reply.lost_reason:
            raise CorruptSnapshot(f"memory cannot restore the job: {reply.lost_reason}")
        return [loc.step for loc in reply.locations if _rebuildable(loc)]

    def fetch(self, job: str, rank: int, step: int | None) -> None:
        """Rebuilds the rank's snapshot of `step` (None: the newest) from fragments into a local slot."""
        try:
            locations = [loc for loc in self._link.locate(job, rank).locations if _rebuildable(loc)]
        except grpc.RpcError as exc:
            raise Unavailable(f"coordinator unreachable while locating job {job!r} rank {rank}: {exc.code().name}") from None
        chosen = next((loc for loc in locations if step is None or loc.step == step), None)
        if chosen is None:
            raise NotFound(f"job {job!r} rank {rank}: no live peers hold step {step if step is not None else '(any)'}")
        started = time.perf_counter()
        fragments, meta, checksums = self._gather(job, rank, chosen)
        data = decode(fragments, Scheme(k=chosen.k, m=chosen.m, size_bytes=chosen.size_bytes))
        self._store.install(job, rank, chosen.step, memoryview(data), meta, checksums)
        log.info(
            "rebuilt job=%s rank=%d step=%d from fragments %s in %.3f s",
            job,
            rank,
            chosen.step,
            sorted(fragments),
            time.perf_counter() - started,
        )

    def _gather(self, job: str, rank: int, location: pb.SnapshotLocation) -> tuple[dict[int, bytes], bytes, tuple[int, ...]]:
        """Any k good fragments of the location's attempt, data fragments first; with the meta
        and the owner's checksums they carry."""
        fragments: dict[int, bytes] = {}
        meta = b""
        checksums: tuple[int, ...] = ()
        for holder in sorted(location.fragments, key=lambda h: h.index):
            if len(fragments) == location.k:
                break
            try:
                header, data = self._peers.get_fragment(holder.address, job, rank, holder.index, location.step)
            except MemckptError as exc:  # a dead or corrupt holder: the next one will do
                log.warning("fragment %d of job=%s rank=%d from %s unusable: %s", holder.index, job, rank, holder.node, exc)
                continue
            if header.generation != location.generation:  # that holder has another attempt's step
                log.warning(
                    "fragment %d of job=%s rank=%d on %s is of generation %d, not %d; skipped",
                    holder.index,
                    job,
                    rank,
                    holder.node,
                    header.generation,
                    location.generation,
                )
                continue
            fragments[holder.index] = data
            meta, checksums = header.meta.encode(), header.snapshot_checksums
        if len(fragments) < location.k:
            raise Unavailable(f"job {job!r} rank {rank} step {location.step}: only {len(fragments)} of {location.k} fragments")
        return fragments, meta, checksums


def _rebuildable(location: pb.SnapshotLocation) -> bool:
    return location.k > 0 and len({h.index for h in location.fragments}) >= location.k
