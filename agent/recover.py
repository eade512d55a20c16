"""Restore anywhere: bring a rank's snapshot that this agent does not hold from its peers.

The coordinator says where the rank's fragments live; any k of them, each checked by
crc, are decoded here and installed as a committed local slot, so the normal restore
path (checksum verification, copy into the trainer's tensors) takes over unchanged.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import grpc

from memckpt.agent import metrics
from memckpt.agent.coordination import CoordinatorLink
from memckpt.agent.erasure import Scheme, rebuild_missing
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.peers import PeerClient, WriteAt
from memckpt.agent.store import DirectFragment, DirectPlan, InstallTarget, SlotStore
from memckpt.errors import CorruptSnapshot, MemckptError, NotFound, Unavailable
from memckpt.protos import coordinator_pb2 as pb

log = logging.getLogger(__name__)

DECODE_THREADS = 2  # XOR and zfec release the GIL: a rebuild runs on this many cores


class RemoteRestore:
    def __init__(self, *, link: CoordinatorLink, peers: PeerClient, store: SlotStore) -> None:
        self._link = link
        self._peers = peers
        self._store = store

    def steps(self, job: str, rank: int) -> list[int]:
        """Steps of the rank that enough live peers can rebuild.

        Raises:
            CorruptSnapshot: the rank had snapshots, but too many of their holders failed:
                memory cannot restore it (DATA_LOSS), and the job must not start over silently.
            Unavailable: the coordinator cannot be asked (unreachable, or still rebuilding its
                tables after a restart): whether peers hold the rank is unknown.
        """
        try:
            reply = self._link.locate(job, rank)
        except grpc.RpcError as exc:
            raise Unavailable(
                f"cannot ask the coordinator where job {job!r} rank {rank} is: {exc.code().name}: {exc.details()}"
            ) from None
        if reply.lost_reason:
            raise CorruptSnapshot(f"memory cannot restore the job: {reply.lost_reason}")
        return [loc.step for loc in reply.locations if _rebuildable(loc)]

    def fetch(self, job: str, rank: int, step: int | None) -> None:
        """Rebuilds the rank's snapshot of `step` (None: the newest) from fragments into a local slot.

        The slot is begun first and the data fragments are written straight into it; missing ones
        are decoded in place. Nothing is checksummed here beyond each fragment's own crc: the
        restore that follows verifies the slot against the owner's checksums. A failed rebuild
        leaves no slot behind.
        """
        chosen = self._locate(job, rank, step)
        started = time.perf_counter()
        scheme = Scheme(k=chosen.k, m=chosen.m, size_bytes=chosen.size_bytes)
        padded = scheme.fragment_bytes * scheme.k  # the last data fragment's zero padding lands in the slot too
        target = self._store.begin_install(job, rank, chosen.step, padded)
        try:
            with ThreadPoolExecutor(max_workers=max(chosen.k, DECODE_THREADS), thread_name_prefix="rebuild") as pool:
                gathered = self._gather(job, rank, chosen, scheme, target, pool)
                fetched_s = time.perf_counter() - started
                rebuild_missing(target.buffer[:padded], gathered.parity, gathered.data, scheme, mapper=pool.map)
            decoded_s = time.perf_counter() - started
            metrics.DECODE_SECONDS.observe(decoded_s - fetched_s)
            self._store.commit_install(target, scheme.size_bytes, gathered.meta, gathered.checksums)
        except BaseException:
            self._store.abort_install(target)
            raise
        log.info(
            "rebuilt job=%s rank=%d step=%d from fragments %s in %.3f s (fetched at %.3f s, decoded at %.3f s)",
            job,
            rank,
            chosen.step,
            sorted([*gathered.data, *gathered.parity]),
            time.perf_counter() - started,
            fetched_s,
            decoded_s,
        )

    def plan_direct(self, job: str, rank: int, step: int | None) -> DirectPlan | None:
        """Where the caller (a trainer on this node) fetches the rank's snapshot of `step` (None:
        the newest) itself: a bulk ticket on each holder of a data fragment, so the bytes go from
        the peers' memory straight into the trainer's tensors, with no slot of fresh memory here
        and no second copy. None when that cannot be: a data fragment's holder is gone (a decode
        is needed), a holder has no bulk channel, TLS is on between agents, or a holder refuses;
        then `fetch` rebuilds the snapshot here. Raises as `fetch` when nothing holds it."""
        if not self._peers.hands_out_tickets:
            return None
        chosen = self._locate(job, rank, step)
        scheme = Scheme(k=chosen.k, m=chosen.m, size_bytes=chosen.size_bytes)
        holders: dict[int, pb.FragmentHolder] = {}
        for holder in chosen.fragments:
            if holder.index < chosen.k:
                holders.setdefault(holder.index, holder)
        if len(holders) < chosen.k:
            return None
        with ThreadPoolExecutor(max_workers=chosen.k, thread_name_prefix="ticket") as pool:
            asked = {i: pool.submit(self._peers.get_ticket, h.address, job, rank, i, chosen.step) for i, h in holders.items()}
        fragments = []
        meta = ""
        checksums: tuple[int, ...] = ()
        for index, future in sorted(asked.items()):
            holder = holders[index]
            try:
                got = future.result()
            except MemckptError as exc:
                log.info("direct restore of job=%s rank=%d: fragment %d on %s: %s", job, rank, index, holder.node, exc)
                return None
            if got is None:
                return None
            header, host, port, ticket = got
            if (header.generation, header.step, header.fragment_bytes) != (chosen.generation, chosen.step, scheme.fragment_bytes):
                log.info("direct restore of job=%s rank=%d: %s on %s is not the one located", job, rank, header, holder.node)
                return None
            meta, checksums = header.meta, header.snapshot_checksums
            fragments.append(DirectFragment(index=index, node=holder.node, host=host, port=port, ticket=ticket))
        log.info(
            "direct restore of job=%s rank=%d step=%d: the trainer fetches fragments %s from %s",
            job,
            rank,
            chosen.step,
            [f.index for f in fragments],
            [f.node for f in fragments],
        )
        return DirectPlan(
            step=chosen.step,
            data_size_bytes=scheme.size_bytes,
            fragment_bytes=scheme.fragment_bytes,
            meta=meta.encode(),
            checksums=tuple(checksums),
            fragments=tuple(fragments),
        )

    def _locate(self, job: str, rank: int, step: int | None) -> pb.SnapshotLocation:
        """Where enough live peers hold the rank's `step` (None: the newest); raises NotFound, Unavailable."""
        try:
            locations = [loc for loc in self._link.locate(job, rank).locations if _rebuildable(loc)]
        except grpc.RpcError as exc:
            raise Unavailable(f"coordinator unreachable while locating job {job!r} rank {rank}: {exc.code().name}") from None
        chosen = next((loc for loc in locations if step is None or loc.step == step), None)
        if chosen is None:
            raise NotFound(f"job {job!r} rank {rank}: no live peers hold step {step if step is not None else '(any)'}")
        return chosen

    def _gather(
        self,
        job: str,
        rank: int,
        location: pb.SnapshotLocation,
        scheme: Scheme,
        target: InstallTarget,
        pool: ThreadPoolExecutor,
    ) -> _Gathered:
        """Any k good fragments of the location's attempt, fetched in parallel, data fragments
        first: a data fragment written straight into its place in the target slot, a parity one
        into its own buffer; a dead, corrupt or stale holder is replaced by the next. With the
        meta and the owner's checksums they carry."""
        size = scheme.fragment_bytes
        candidates = sorted(location.fragments, key=lambda h: h.index)
        gathered = _Gathered()
        running: dict[Future[tuple[FragmentHeader, memoryview | None]], pb.FragmentHolder] = {}

        def fetch_one(holder: pb.FragmentHolder) -> tuple[FragmentHeader, memoryview | None]:
            if holder.index >= scheme.k:
                return self._peers.get_fragment(holder.address, job, rank, holder.index, location.step)
            base = holder.index * size

            def into_slot(header: FragmentHeader) -> WriteAt:
                if header.fragment_bytes != size:  # the slot is sized by the coordinator's word
                    raise CorruptSnapshot(f"{header} from {holder.node} is {header.fragment_bytes} bytes, not {size}")
                return lambda offset, data: target.writer.write_at(base + offset, data)

            return self._peers.receive_fragment(holder.address, job, rank, holder.index, location.step, into_slot), None

        def start_more() -> None:
            busy = {h.index for h in running.values()} | gathered.indices()
            while candidates and len(running) + len(gathered.indices()) < location.k:
                holder = candidates.pop(0)
                if holder.index not in busy and 0 <= holder.index < scheme.k + scheme.m:
                    running[pool.submit(fetch_one, holder)] = holder
                    busy.add(holder.index)

        start_more()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                holder = running.pop(future)
                try:
                    header, data = future.result()
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
                gathered.add(holder.index, data)
                gathered.meta, gathered.checksums = header.meta.encode(), header.snapshot_checksums
            start_more()
        if len(gathered.indices()) < location.k:
            raise Unavailable(
                f"job {job!r} rank {rank} step {location.step}: only {len(gathered.indices())} of {location.k} fragments"
            )
        return gathered


@dataclass(slots=True)
class _Gathered:
    data: list[int] = field(default_factory=list)  # data fragments, in place in the slot
    parity: dict[int, memoryview] = field(default_factory=dict)
    meta: bytes = b""
    checksums: tuple[int, ...] = ()

    def indices(self) -> set[int]:
        return {*self.data, *self.parity}

    def add(self, index: int, data: memoryview | None) -> None:
        """A data fragment (in place in the slot: no buffer), or a parity fragment's buffer."""
        if data is None:
            self.data.append(index)
        else:
            self.parity[index] = data


def _rebuildable(location: pb.SnapshotLocation) -> bool:
    return location.k > 0 and len({h.index for h in location.fragments}) >= location.k
