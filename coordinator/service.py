"""CoordinatorService over gRPC: a thin, locked layer over `Cluster`."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from memckpt.coordinator import wire
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.membership import Change
from memckpt.names import check_name
from memckpt.protos import coordinator_pb2 as pb
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.rpc import map_errors

log = logging.getLogger(__name__)


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, cluster: Cluster, heartbeat_interval_s: float) -> None:
        self._cluster = cluster
        self._interval_s = heartbeat_interval_s
        self._lock = threading.Lock()

    def tick(self) -> Change:
        with self._lock:
            change = self._cluster.tick(time.monotonic())
        if change.changed:
            log.warning("membership: %s; groups: %s", change.reason, self._cluster.groups.reason)
        return change

    @map_errors
    def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Any) -> pb.RegisterAgentResponse:
        info = wire.agent_from_proto(request.agent)
        with self._lock:
            incarnation, change = self._cluster.register_agent(info, wire.held_from_proto(request.held), time.monotonic())
            groups = self._cluster.groups.reason
        log.info("membership: %s; groups: %s", change.reason, groups)
        return pb.RegisterAgentResponse(
            incarnation=incarnation, lease_s=self._cluster.lease_s, heartbeat_interval_s=self._interval_s
        )

    @map_errors
    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        check_name(request.node, "node")
        with self._lock:
            held = wire.held_from_proto(request.held)
            accepted = self._cluster.heartbeat(
                request.node, request.incarnation, held, time.monotonic(), request.memory_used_bytes
            )
            group = self._cluster.group_of(request.node) if accepted else []
        return pb.HeartbeatResponse(
            accepted=accepted, group=[wire.agent_to_proto(i) for i in group], k=self._cluster.k, m=self._cluster.m
        )

    @map_errors
    def StartGeneration(self, request: pb.StartGenerationRequest, context: Any) -> pb.StartGenerationResponse:
        with self._lock:
            generation = self._cluster.start_generation(request.job, request.world_size, request.previous_generation)
        log.info("job=%s generation=%d world_size=%d", request.job, generation, request.world_size)
        return pb.StartGenerationResponse(generation=generation)

    @map_errors
    def GetRecoveryPlan(self, request: pb.GetRecoveryPlanRequest, context: Any) -> pb.GetRecoveryPlanResponse:
        check_name(request.job, "job")
        with self._lock:
            decision = self._cluster.recovery_plan(request.job, request.generation)
            addresses = {a.node: a.address for a in self._cluster.membership.alive()}
        log.info("plan job=%s generation=%d: %s", request.job, request.generation, decision.reason)
        return wire.plan_to_proto(decision, addresses)

    @map_errors
    def LocateSnapshots(self, request: pb.LocateSnapshotsRequest, context: Any) -> pb.LocateSnapshotsResponse:
        check_name(request.job, "job")
        with self._lock:
            found, lost = self._cluster.locate(request.job, request.rank)
            addresses = {a.node: a.address for a in self._cluster.membership.alive()}
        locations = [wire.location_to_proto(step, s, addresses) for step, s in found]
        return pb.LocateSnapshotsResponse(locations=locations, lost_reason=lost)

    @map_errors
    def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context: Any) -> pb.GetClusterStatusResponse:
        with self._lock:
            return self._status()

    def _status(self) -> pb.GetClusterStatusResponse:
        cluster = self._cluster
        agents = []
        for node, member in sorted(cluster.membership.members.items()):
            group = next((i for i, g in enumerate(cluster.groups.groups) if node in g), -1)
            agents.append(
                pb.AgentStatus(
                    agent=wire.agent_to_proto(member.info),
                    alive=member.alive,
                    group=group,
                    memory_used_bytes=cluster.memory_used.get(node, 0),
                )
            )
        jobs = []
        for job, record in sorted(cluster.jobs.items()):
            steps = cluster.rank_steps(job)
            ranks = [
                pb.JobRankStatus(rank=r, committed_step=s.committed, protected_step=s.protected) for r, s in sorted(steps.items())
            ]
            jobs.append(pb.JobStatus(job=job, generation=record.generation, world_size=record.world_size, ranks=ranks))
        return pb.GetClusterStatusResponse(agents=agents, jobs=jobs)
