"""The trainer's gRPC client of its node agent: typed calls, memckpt errors, fast reconnects."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from memckpt.agent.slots import Attempt
from memckpt.agent.store import RestoreSource, SlotGrant
from memckpt.agent.wire import restore_from_proto
from memckpt.errors import MemckptError, NotFound
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.rpc import error_from_rpc

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
REGISTER_TIMEOUT_S = 600.0  # the agent allocates and pre-faults the slots during the call
DETACH_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 120.0  # an agent with nothing local may wait for the coordinator (its --restore-wait-s)
_OPTIONS = [
    # the agent restarts in seconds: do not back off for minutes
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """What a rank can restore: steps in memory (their slot names; "" while peers hold them)
    and complete persisted checkpoints, each in `persisted_dir`/step-NNNNNNNNNNNN."""

    memory: dict[int, str] = field(default_factory=dict)
    persisted: tuple[int, ...] = ()
    persisted_dir: Path | None = None

    def steps(self) -> list[int]:
        return sorted(set(self.memory) | set(self.persisted), reverse=True)


class AgentClient:
    """Calls of one rank to the agent at `socket_path`; every failure is a memckpt error."""

    def __init__(self, socket_path: Path, job: str, rank: int, attempt: Attempt) -> None:
        self.socket_path = socket_path
        self.job = job
        self.rank = rank
        self.attempt = attempt
        self._channel = grpc.insecure_channel(f"unix:{socket_path}", options=_OPTIONS)
        self._stub = pb_grpc.AgentServiceStub(self._channel)
        self._session: object | None = None  # the Attach stream while the rank trains

    def register(self, world_size: int, slot_size_bytes: int) -> None:
        request = pb.RegisterRankRequest(
            job=self.job,
            rank=self.rank,
            world_size=world_size,
            slot_size_bytes=slot_size_bytes,
            generation=self.attempt.generation,
            run_id=self.attempt.run_id,
        )
        self._call("RegisterRank", request, REGISTER_TIMEOUT_S)

    def begin(self, step: int, size_bytes: int) -> SlotGrant:
        request = pb.BeginSnapshotRequest(
            job=self.job,
            rank=self.rank,
            step=step,
            size_bytes=size_bytes,
            generation=self.attempt.generation,
            run_id=self.attempt.run_id,
        )
        response = self._call("BeginSnapshot", request, REGISTER_TIMEOUT_S)
        return SlotGrant(index=response.slot_index, name=response.slot_name, size_bytes=response.slot_size_bytes)

    def commit(self, step: int, slot_index: int, data_size_bytes: int, meta: bytes) -> None:
        request = pb.CommitSnapshotRequest(
            job=self.job,
            rank=self.rank,
            step=step,
            slot_index=slot_index,
            data_size_bytes=data_size_bytes,
            meta=meta,
            generation=self.attempt.generation,
            run_id=self.attempt.run_id,
        )
        self._call("CommitSnapshot", request, CALL_TIMEOUT_S)

    def list_snapshots(self, world_size: int) -> Listing:
        """The steps this rank can restore at `world_size`: from memory (with their slots) and
        persisted; empty if none."""
        try:
            request = pb.ListSnapshotsRequest(job=self.job, rank=self.rank)
            response = self._call("ListSnapshots", request, LIST_TIMEOUT_S, wait_for_ready=True)
        except NotFound:
            return Listing()
        stale = {s: w for s, w in zip(response.steps, response.world_sizes) if w and w != world_size}
        if stale:
            log.warning(
                "job=%s rank=%d: snapshots %s were taken at world size %s, not %d: only persisted checkpoints can load",
                self.job,
                self.rank,
                sorted(stale),
                sorted(set(stale.values())),
                world_size,
            )
        return Listing(
            memory={s: name for s, name in zip(response.steps, response.slot_names) if s not in stale},
            persisted=tuple(response.persisted_steps),
            persisted_dir=Path(response.persisted_dir) if response.persisted_dir else None,
        )

    def open_restore(self, step: int | None = None, direct_ok: bool = False) -> RestoreSource:
        """The snapshot to restore, verified in a slot; with `direct_ok`, for one the agent does not
        hold, possibly a plan to fetch it from peers instead (`RestoreSource.direct`)."""
        request = pb.OpenRestoreRequest(job=self.job, rank=self.rank, direct_ok=direct_ok)
        if step is not None:
            request.step = step
        return restore_from_proto(self._call("OpenRestore", request, REGISTER_TIMEOUT_S, wait_for_ready=True))

    def attach(self, restored_from: str = "", restored_step: int = -1) -> None:
        """Opens the rank's session with the agent unless one is open: when it ends without
        `detach` (the process died), the agent persists the rank's newest snapshots at once.
        It also tells the agent where this process restored the rank from, for status."""
        if self._session is not None and self._session.is_active():  # type: ignore[attr-defined]
            return
        request = pb.AttachRequest(
            job=self.job,
            rank=self.rank,
            generation=self.attempt.generation,
            run_id=self.attempt.run_id,
            restored_from=restored_from,
            restored_step=restored_step,
        )
        self._session = self._stub.Attach(request)

    def detach(self) -> None:
        """Ends the session cleanly (best effort: an agent that is gone cannot be told)."""
        if self._session is None:
            return
        try:
            attempt = self.attempt
            request = pb.DetachRequest(job=self.job, rank=self.rank, generation=attempt.generation, run_id=attempt.run_id)
            self._call("Detach", request, DETACH_TIMEOUT_S)
        except MemckptError:
            pass
        self._session.cancel()  # type: ignore[attr-defined]
        self._session = None

    def close(self) -> None:
        self.detach()
        self._channel.close()

    def _call(self, name: str, request: Any, timeout_s: float, wait_for_ready: bool = False) -> Any:
        """One call. Snapshot calls fail fast while the agent is away (the next snapshot retries);
        restore and registration wait for it (`wait_for_ready`), up to their timeout."""
        try:
            return getattr(self._stub, name)(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"{name} job={self.job} rank={self.rank}") from None
