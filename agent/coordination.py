"""The agent's link to the coordinator: register, then heartbeat with what it holds.

Runs on its own thread and never blocks the slot store. While the coordinator is away the
agent keeps serving its ranks; it registers again when the coordinator is back (or when
a heartbeat is refused because the coordinator restarted or declared it failed).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from memckpt.coordinator import wire
from memckpt.coordinator.cluster import Held
from memckpt.coordinator.membership import AgentInfo
from memckpt.coordinator.protection import JobProtection
from memckpt.protos import coordinator_pb2 as pb
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata

log = logging.getLogger(__name__)

RETRY_S = 1.0
CALL_TIMEOUT_S = 5.0


class CoordinatorLink:
    def __init__(
        self,
        *,
        address: str,
        info: AgentInfo,
        inventory: Callable[[], tuple[Held, ...]],
        token: str,
        tls: TlsFiles,
        memory_used: Callable[[], int],
    ) -> None:
        self._address = address
        self._info = info
        self._inventory = inventory
        self._memory_used = memory_used
        self._metadata = token_metadata(token)
        credentials = channel_credentials(tls)
        self._channel = grpc.secure_channel(address, credentials) if credentials is not None else grpc.insecure_channel(address)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
        self._beats = HeartbeatStream(self._stub, self._metadata)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coordinator-link", daemon=True)
        self.group: tuple[AgentInfo, ...] = ()
        self.draining: frozenset[str] = frozenset()  # members of the group being drained: never fragment holders
        self.k = 0  # the cluster's erasure scheme, told with the group
        self.m = 0
        self._instance = secrets.randbits(63) + 1  # tells the coordinator a restarted agent from a re-registration
        self.connected = threading.Event()
        self._protection: dict[str, JobProtection] = {}  # job -> the coordinator's latest word
        # called after the kept steps changed, or this node started or stopped being drained
        self.on_protection: Callable[[], object] = lambda: None
        # called with (job, generation) at each heartbeat that says the job was released: drop it
        self.on_release: Callable[[str, int], object] = lambda job, generation: None

    @property
    def is_draining(self) -> bool:
        """Whether the coordinator drains this node: it holds fragments for nobody."""
        return self._info.node in self.draining

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._beats.close()
        self._thread.join(timeout=timeout_s)
        self._channel.close()

    def target(self, job: str, generation: int) -> int | None:
        """The step the coordinator wants the job's ranks of `generation` to protect next
        (negative: none now, also while it has not seen the job yet); None while the
        coordinator is unreachable (then each rank protects its newest)."""
        if not self.connected.is_set():
            return None  # alone: protect what we can, unaligned, rather than nothing
        protection = self._protection.get(job)
        if protection is None or protection.generation != generation:
            return -1  # the coordinator has not seen this job (or attempt) yet: wait for its word
        return protection.target

    def kept_version(self, job: str) -> tuple[int, int] | None:
        """(generation, step) of the job's newest step protected for every rank, if known."""
        protection = self._protection.get(job)
        if protection is None or protection.keep < 0:
            return None
        return (protection.generation, protection.keep)

    def release(self, job: str) -> pb.ClusterReleaseJobResponse:
        """Asks the coordinator to have every agent drop the job; raises grpc.RpcError (NOT_FOUND
        for a job it does not know, UNAVAILABLE when unreachable)."""
        request = pb.ClusterReleaseJobRequest(job=job)
        reply: pb.ClusterReleaseJobResponse = self._stub.ReleaseJob(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        return reply

    def locate(self, job: str, rank: int) -> pb.LocateSnapshotsResponse:
        """Where the cluster holds `rank`'s snapshots (newest first); raises grpc.RpcError when unreachable."""
        request = pb.LocateSnapshotsRequest(job=job, rank=rank)
        reply: pb.LocateSnapshotsResponse = self._stub.LocateSnapshots(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        return reply

    def _loop(self) -> None:
        incarnation, interval_s = 0, RETRY_S
        while not self._stop.is_set():
            try:
                if incarnation == 0:
                    incarnation, interval_s = self._register()
                elif not self._heartbeat(incarnation):
                    log.warning(
                        "coordinator %s refused heartbeat of incarnation %d; registering again", self._address, incarnation
                    )
                    incarnation = 0
                    continue
            except grpc.RpcError as exc:
                if self.connected.is_set() or incarnation:
                    log.warning("coordinator %s unreachable (%s); training goes on, retrying", self._address, exc.code().name)
                self.connected.clear()
                incarnation, interval_s = 0, RETRY_S
            except Exception:  # the link must outlive any one bad report
                log.exception("coordinator link failed; retrying")
                incarnation, interval_s = 0, RETRY_S
            self._stop.wait(interval_s)

    def _register(self) -> tuple[int, float]:
        request = pb.RegisterAgentRequest(
            agent=wire.agent_to_proto(self._info), held=wire.held_to_proto(self._inventory()), instance_id=self._instance
        )
        reply = self._stub.RegisterAgent(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        self.connected.set()
        log.info("registered with coordinator %s incarnation=%d lease_s=%.1f", self._address, reply.incarnation, reply.lease_s)
        return reply.incarnation, reply.heartbeat_interval_s

    def _heartbeat(self, incarnation: int) -> bool:
        request = pb.HeartbeatRequest(
            node=self._info.node,
            incarnation=incarnation,
            held=wire.held_to_proto(self._inventory()),
            memory_used_bytes=self._memory_used(),
        )
        reply = self._beats.send(request, CALL_TIMEOUT_S)
        if reply.accepted:
            self.k, self.m = reply.k, reply.m
            group = tuple(wire.agent_from_proto(a) for a in reply.group)
            draining = frozenset(a.node for a in reply.group if a.draining)
            was_draining = self.is_draining
            if group != self.group or draining != self.draining:
                log.info("protection group now %s, draining %s", [a.node for a in group], sorted(draining))
                # draining first: a reader that sees the new group sees who in it holds nothing
                self.draining = draining
                self.group = group
            if self.is_draining != was_draining:
                now = "being drained: it holds fragments for nobody" if self.is_draining else "no longer drained"
                log.info("this node is %s", now)
            self._learn_protection(reply.protection, self.is_draining != was_draining)
        return bool(reply.accepted)

    def _learn_protection(self, messages: Iterable[pb.JobProtection], force: bool = False) -> None:
        protection = {
            p.job: JobProtection(generation=p.generation, target=p.target_step, keep=p.keep_step, released=p.released)
            for p in messages
        }
        for job, p in protection.items():
            if p.released:
                self.on_release(job, p.generation)
        kept_changed = {j: (p.generation, p.keep) for j, p in protection.items()} != {
            j: (p.generation, p.keep) for j, p in self._protection.items()
        }
        self._protection = protection  # replaced whole: readers on other threads see one or the other
        if kept_changed or force:
            self.on_protection()


class StreamEnded(grpc.RpcError):
    """The coordinator ended the heartbeat stream (it is stopping): as if unreachable."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class HeartbeatStream:
    """Heartbeats over one StreamHeartbeats call (a message costs the coordinator a fraction of a
    call), opened on first use and again after an error; one Heartbeat call each instead when the
    coordinator has no such method (an older one). Used by one thread; `close` from any."""

    def __init__(self, stub: Any, metadata: Any) -> None:
        self._stub = stub
        self._metadata = metadata
        self._requests: queue.SimpleQueue[pb.HeartbeatRequest | None] = queue.SimpleQueue()
        self._replies: Any = None  # the call: an iterator of replies
        self._unary = False

    def send(self, request: pb.HeartbeatRequest, timeout_s: float) -> pb.HeartbeatResponse:
        """The coordinator's reply; raises grpc.RpcError (CANCELLED after `timeout_s`) when it does not come."""
        if self._unary:
            reply: pb.HeartbeatResponse = self._stub.Heartbeat(request, metadata=self._metadata, timeout=timeout_s)
            return reply
        if self._replies is None:
            self._requests = queue.SimpleQueue()
            self._replies = self._stub.StreamHeartbeats(iter(self._requests.get, None), metadata=self._metadata)
        replies = self._replies
        self._requests.put(request)
        timer = threading.Timer(timeout_s, replies.cancel)
        timer.start()
        try:
            reply = next(replies)
        except StopIteration:
            self.close()
            raise StreamEnded() from None
        except grpc.RpcError as exc:
            self.close()
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("coordinator has no heartbeat streams; one call per heartbeat")
            self._unary = True
            return self.send(request, timeout_s)
        finally:
            timer.cancel()
        return reply

    def close(self) -> None:
        """Ends the stream, if open (the next `send` opens another)."""
        replies, self._replies = self._replies, None
        self._requests.put(None)  # ends the request iterator gRPC's thread reads
        if replies is not None:
            replies.cancel()
