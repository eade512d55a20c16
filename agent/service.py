"""AgentService over gRPC: a thin layer over SlotStore. Errors map through `memckpt.rpc`."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from memckpt import __version__
from memckpt.agent import checkpoints, metrics, wire
from memckpt.agent.recover import RemoteRestore
from memckpt.agent.sessions import Sessions
from memckpt.agent.slots import Attempt, RankKey, RankSlots
from memckpt.agent.store import SlotStore
from memckpt.errors import CorruptSnapshot, FailedPrecondition, InvalidRequest, NotFound, Unavailable
from memckpt.names import check_name
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.rpc import map_errors

if TYPE_CHECKING:
    from memckpt.agent.persist import JobStatus  # imports torch: only an agent that persists loads it

log = logging.getLogger(__name__)

REMOTE_RETRY_S = 0.5
MAX_SESSIONS = 96  # each open Attach stream holds one thread of the server's pool (see daemon.RPC_THREADS)


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        store: SlotStore,
        node: str,
        remote: RemoteRestore | None = None,
        remote_wait_s: float = 30.0,
        persist_root: Path | None = None,
    ) -> None:
        self._store = store
        self._node = node
        self.remote = remote  # with a coordinator: snapshots of ranks this agent does not hold
        self.direct_restore = True  # a trainer that can may fetch such a snapshot from the peers itself
        self.remote_wait_s = remote_wait_s  # how long a restore with nothing local waits for the coordinator
        self.persist_root = persist_root  # complete checkpoints there are restore points too
        self.persistence: Callable[[], dict[str, JobStatus]] = dict  # what the persister did, per job
        self.sessions = Sessions(limit=MAX_SESSIONS)
        self.on_rank_died: Callable[[RankKey, Attempt], None] = lambda key, attempt: None
        # with a coordinator: has every agent drop a job (this one's fragments too); returns
        # (the generation released, the live nodes that held some); raises grpc.RpcError
        self.release_everywhere: Callable[[str], tuple[int, int]] | None = None
        self.metrics_address = ""  # where Prometheus scrapes this agent, if it serves metrics
        self._begun: dict[RankKey, float] = {}  # when each rank's snapshot in flight began (commit latency)
        self._restored: dict[RankKey, tuple[str, int]] = {}  # each rank's last restore: (source, step)
        self._spared: frozenset[str] = frozenset()  # released jobs whose ranks still train here (warned once)

    @map_errors
    def RegisterRank(self, request: pb.RegisterRankRequest, context: Any) -> pb.RegisterRankResponse:
        slots = self._store.register(request.job, request.rank, request.world_size, request.slot_size_bytes, _attempt(request))
        metrics.job_seen(request.job)
        latest = slots.latest_committed()
        return pb.RegisterRankResponse(
            slot_size_bytes=request.slot_size_bytes,
            has_committed=latest is not None,
            committed_step=latest.step if latest else -1,
        )

    @map_errors
    def BeginSnapshot(self, request: pb.BeginSnapshotRequest, context: Any) -> pb.BeginSnapshotResponse:
        try:
            grant = self._store.begin(request.job, request.rank, request.step, request.size_bytes, _attempt(request))
        except Unavailable:
            metrics.SKIPPED.labels(request.job).inc()  # both slots kept: the snapshot is skipped
            raise
        self._begun[RankKey(job=request.job, rank=request.rank)] = time.perf_counter()
        return wire.grant_to_proto(grant)

    @map_errors
    def CommitSnapshot(self, request: pb.CommitSnapshotRequest, context: Any) -> pb.CommitSnapshotResponse:
        slot = self._store.commit(
            request.job, request.rank, request.step, request.slot_index, request.data_size_bytes, request.meta, _attempt(request)
        )
        metrics.SNAPSHOTS.labels(request.job).inc()
        metrics.SNAPSHOT_BYTES.labels(request.job).inc(request.data_size_bytes)
        begun = self._begun.pop(RankKey(job=request.job, rank=request.rank), None)
        if begun is not None:
            metrics.COMMIT_SECONDS.labels(request.job).observe(time.perf_counter() - begun)
        return pb.CommitSnapshotResponse(step=slot.step)

    @map_errors
    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Any) -> pb.ListSnapshotsResponse:
        persisted = checkpoints.complete_steps(self.persist_root, request.job) if self.persist_root else []
        try:
            snapshots = self._store.list_snapshots(request.job, request.rank)
        except NotFound:
            if self.remote is None and not persisted:
                raise
            snapshots = []
        held = [(step, name) for step, name, _ in snapshots]
        world_sizes = [world for _, _, world in snapshots]
        if self.remote is not None:  # steps peers can rebuild; their slot is made when restored
            try:
                held += self._remote_steps(request.job, request.rank, {step for step, _ in held})
            except CorruptSnapshot as exc:
                if not persisted:
                    raise
                log.warning("job=%s rank=%d: %s; the filesystem holds steps %s", request.job, request.rank, exc, persisted)
        if not held and not persisted:
            raise NotFound(f"job {request.job!r} rank {request.rank} has no snapshot here, on live peers or persisted")
        return pb.ListSnapshotsResponse(
            steps=[step for step, _ in held],
            slot_names=[name for _, name in held],
            persisted_steps=persisted,
            persisted_dir=str(self.persist_root / request.job) if persisted and self.persist_root else "",
            world_sizes=world_sizes + [0] * (len(held) - len(world_sizes)),
        )

    def _remote_steps(self, job: str, rank: int, local: set[int]) -> list[tuple[int, str]]:
        """Steps peers can rebuild that are not held here, with "" for the slot not made yet.

        With nothing here, "none on peers either" is an answer only the coordinator can give:
        while it cannot (unreachable, or rebuilding its tables after a restart) this waits up
        to `remote_wait_s`, then raises Unavailable, so a rank on a replacement node never
        takes an unanswered question for a fresh start. With local steps, those are served.
        """
        assert self.remote is not None
        deadline = time.monotonic() + self.remote_wait_s
        while True:
            try:
                return [(step, "") for step in self.remote.steps(job, rank) if step not in local]
            except Unavailable as exc:
                if local:
                    log.warning("job=%s rank=%d: serving local steps only: %s", job, rank, exc)
                    return []
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"job {job!r} rank {rank}: no snapshot on this agent, and whether peers hold one is unknown "
                        f"after {self.remote_wait_s:.0f} s ({exc}); not starting fresh"
                    ) from None
                time.sleep(REMOTE_RETRY_S)

    @map_errors
    def OpenRestore(self, request: pb.OpenRestoreRequest, context: Any) -> pb.OpenRestoreResponse:
        step = request.step if request.HasField("step") else None
        started = time.perf_counter()
        try:
            source = self._store.open_restore(request.job, request.rank, step)
        except NotFound:
            if self.remote is None:
                raise
            if request.direct_ok and self.direct_restore:
                plan = self.remote.plan_direct(request.job, request.rank, step)
                if plan is not None:  # the trainer fetches the bytes itself, straight into its tensors
                    metrics.RESTORES.labels(request.job, "fragments").inc()
                    metrics.DIRECT_RESTORES.labels(request.job).inc()
                    return wire.direct_to_proto(plan)
            self.remote.fetch(request.job, request.rank, step)  # rebuild it here from peers' fragments
            source = dataclasses.replace(self._store.open_restore(request.job, request.rank, step), source="fragments")
        metrics.RESTORES.labels(request.job, source.source).inc()
        metrics.RESTORE_SECONDS.labels(source.source).observe(time.perf_counter() - started)
        return wire.restore_to_proto(source)

    @map_errors
    def ReleaseJob(self, request: pb.ReleaseJobRequest, context: Any) -> pb.ReleaseJobResponse:
        job = check_name(request.job, "job")
        if training := self.sessions.training(job):
            raise FailedPrecondition(
                f"job {job!r}: rank(s) {sorted(training)} still train on this node (their sessions are open); "
                "release a job once it has stopped"
            )
        generation: int | None = None
        holding, unknown = 0, ""
        if self.release_everywhere is not None and not request.local_only:
            try:
                generation, holding = self.release_everywhere(job)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise Unavailable(
                        f"cannot have the coordinator release job {job!r} on every node ({exc.code().name}: {exc.details()}); "
                        "nothing was released: try again, or drop only this agent's slots with --local"
                    ) from None
                unknown = f"; the coordinator: {exc.details()}"
        ranks, freed = self.drop_job(job, generation)
        if generation is None and ranks == 0:
            raise NotFound(f"job {job!r} has no slots on this agent{unknown}")
        return pb.ReleaseJobResponse(
            ranks_released=ranks, bytes_released=freed, cluster_wide=generation is not None, nodes_holding=holding
        )

    def drop_job(self, job: str, up_to_generation: int | None = None) -> tuple[int, int]:
        """Drops the job's slots here (of attempts of `up_to_generation` and older; None: all)
        and its metrics; returns (ranks, bytes) dropped. Ranks still training here keep theirs
        (a release told by the coordinator drops them once their sessions ended)."""
        training = frozenset(self.sessions.training(job))
        if training and job not in self._spared:
            log.warning(
                "job %s was released, but rank(s) %s still train here: their slots stay until they stop", job, sorted(training)
            )
        self._spared = self._spared | {job} if training else self._spared - {job}
        ranks, freed = self._store.release_job(job, up_to_generation, spare=training)
        if ranks:
            metrics.forget(job)
            for key in [k for k in self._restored if k.job == job]:
                self._restored.pop(key, None)
            for key in [k for k in self._begun if k.job == job]:
                self._begun.pop(key, None)
        return ranks, freed

    @map_errors
    def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        ranks, used, limit = self._store.snapshot_status()
        return pb.GetStatusResponse(
            node=self._node,
            memory_used_bytes=used,
            memory_limit_bytes=limit,
            version=__version__,
            pid=os.getpid(),
            ranks=[self._rank_status(r) for r in ranks],
            persistence=[
                pb.PersistStatus(
                    job=job,
                    complete_step=s.complete_step,
                    writing_step=s.writing_step,
                    written_bytes=s.written_bytes,
                    failures=s.failures,
                    last_error=s.last_error,
                )
                for job, s in sorted(self.persistence().items())
            ],
            persist_root=str(self.persist_root or ""),
            metrics_address=self.metrics_address,
        )

    def _rank_status(self, slots: RankSlots) -> pb.RankStatus:
        status = wire.rank_status(slots, self._store.slot_names(slots))
        status.restored_from, status.restored_step = self._restored.get(slots.key, ("", -1))
        return status

    def Attach(self, request: pb.AttachRequest, context: Any) -> Iterator[pb.AttachEvent]:
        """Held open while the rank trains (one server thread each); see `Sessions`."""
        try:
            key = RankKey(job=check_name(request.job, "job"), rank=request.rank)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        session = self.sessions.open(key, _attempt(request))
        if request.restored_from:
            if self._restored.get(key) != (request.restored_from, request.restored_step):
                log.info("%s restored step %d from %s", key, request.restored_step, request.restored_from)
            self._restored[key] = (request.restored_from, request.restored_step)
        if session is None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_SESSIONS} rank sessions are open on this agent")
            return
        ended = threading.Event()
        context.add_callback(ended.set)
        try:
            yield pb.AttachEvent(attached=True)
            ended.wait()
        finally:
            if self.sessions.close(session):
                log.warning("%s (generation %d) died: its session ended without a clean close", key, session.attempt.generation)
                metrics.RANK_DEATHS.labels(key.job).inc()
                self.on_rank_died(key, session.attempt)

    @map_errors
    def Detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachResponse:
        key = RankKey(job=check_name(request.job, "job"), rank=request.rank)
        self.sessions.detach(key, _attempt(request))
        return pb.DetachResponse()


def _attempt(request: Any) -> Attempt:
    return Attempt(run_id=request.run_id, generation=request.generation)
