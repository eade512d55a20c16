from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentDescription(_message.Message):
    __slots__ = ("node", "address", "capacity_bytes", "domain", "draining")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    capacity_bytes: int
    domain: str
    draining: bool
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., domain: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class HeldSnapshot(_message.Message):
    __slots__ = ("job", "rank", "step", "generation", "fragment_indices", "k", "m", "size_bytes", "protected")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_INDICES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    generation: int
    fragment_indices: _containers.RepeatedScalarFieldContainer[int]
    k: int
    m: int
    size_bytes: int
    protected: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., generation: _Optional[int] = ..., fragment_indices: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., size_bytes: _Optional[int] = ..., protected: _Optional[bool] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("agent", "held", "instance_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    agent: AgentDescription
    held: _containers.RepeatedCompositeFieldContainer[HeldSnapshot]
    instance_id: int
    def __init__(self, agent: _Optional[_Union[AgentDescription, _Mapping]] = ..., held: _Optional[_Iterable[_Union[HeldSnapshot, _Mapping]]] = ..., instance_id: _Optional[int] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("incarnation", "lease_s", "heartbeat_interval_s")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    lease_s: float
    heartbeat_interval_s: float
    def __init__(self, incarnation: _Optional[int] = ..., lease_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node", "incarnation", "held", "memory_used_bytes")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    held: _containers.RepeatedCompositeFieldContainer[HeldSnapshot]
    memory_used_bytes: int
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ..., held: _Optional[_Iterable[_Union[HeldSnapshot, _Mapping]]] = ..., memory_used_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatHeader(_message.Message):
    __slots__ = ("node", "incarnation")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node: str
    incarnation: int
    def __init__(self, node: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("accepted", "group", "k", "m", "protection")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    PROTECTION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    group: _containers.RepeatedCompositeFieldContainer[AgentDescription]
    k: int
    m: int
    protection: _containers.RepeatedCompositeFieldContainer[JobProtection]
    def __init__(self, accepted: _Optional[bool] = ..., group: _Optional[_Iterable[_Union[AgentDescription, _Mapping]]] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., protection: _Optional[_Iterable[_Union[JobProtection, _Mapping]]] = ...) -> None: ...

class JobProtection(_message.Message):
    __slots__ = ("job", "generation", "target_step", "keep_step", "released")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TARGET_STEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_STEP_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    target_step: int
    keep_step: int
    released: bool
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., target_step: _Optional[int] = ..., keep_step: _Optional[int] = ..., released: _Optional[bool] = ...) -> None: ...

class StartGenerationRequest(_message.Message):
    __slots__ = ("job", "world_size", "previous_generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    world_size: int
    previous_generation: int
    def __init__(self, job: _Optional[str] = ..., world_size: _Optional[int] = ..., previous_generation: _Optional[int] = ...) -> None: ...

class StartGenerationResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class GetRecoveryPlanRequest(_message.Message):
    __slots__ = ("job", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class FragmentHolder(_message.Message):
    __slots__ = ("index", "node", "address")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    node: str
    address: str
    def __init__(self, index: _Optional[int] = ..., node: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RankSource(_message.Message):
    __slots__ = ("rank", "copies", "fragments", "k", "m", "size_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    copies: _containers.RepeatedCompositeFieldContainer[AgentDescription]
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentHolder]
    k: int
    m: int
    size_bytes: int
    def __init__(self, rank: _Optional[int] = ..., copies: _Optional[_Iterable[_Union[AgentDescription, _Mapping]]] = ..., fragments: _Optional[_Iterable[_Union[FragmentHolder, _Mapping]]] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetRecoveryPlanResponse(_message.Message):
    __slots__ = ("has_plan", "step", "sources", "reason")
    HAS_PLAN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    has_plan: bool
    step: int
    sources: _containers.RepeatedCompositeFieldContainer[RankSource]
    reason: str
    def __init__(self, has_plan: _Optional[bool] = ..., step: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[RankSource, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent", "alive", "group", "memory_used_bytes", "drain")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    agent: AgentDescription
    alive: bool
    group: int
    memory_used_bytes: int
    drain: DrainStatus
    def __init__(self, agent: _Optional[_Union[AgentDescription, _Mapping]] = ..., alive: _Optional[bool] = ..., group: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., drain: _Optional[_Union[DrainStatus, _Mapping]] = ...) -> None: ...

class JobRankStatus(_message.Message):
    __slots__ = ("rank", "committed_step", "protected_step")
    RANK_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    rank: int
    committed_step: int
    protected_step: int
    def __init__(self, rank: _Optional[int] = ..., committed_step: _Optional[int] = ..., protected_step: _Optional[int] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job", "generation", "world_size", "ranks")
    JOB_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    job: str
    generation: int
    world_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[JobRankStatus]
    def __init__(self, job: _Optional[str] = ..., generation: _Optional[int] = ..., world_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[JobRankStatus, _Mapping]]] = ...) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("agents", "jobs", "metrics_address")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    metrics_address: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class LocateSnapshotsRequest(_message.Message):
    __slots__ = ("job", "rank")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class SnapshotLocation(_message.Message):
    __slots__ = ("step", "generation", "copies", "fragments", "k", "m", "size_bytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    generation: int
    copies: _containers.RepeatedCompositeFieldContainer[AgentDescription]
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentHolder]
    k: int
    m: int
    size_bytes: int
    def __init__(self, step: _Optional[int] = ..., generation: _Optional[int] = ..., copies: _Optional[_Iterable[_Union[AgentDescription, _Mapping]]] = ..., fragments: _Optional[_Iterable[_Union[FragmentHolder, _Mapping]]] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class LocateSnapshotsResponse(_message.Message):
    __slots__ = ("locations", "lost_reason")
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LOST_REASON_FIELD_NUMBER: _ClassVar[int]
    locations: _containers.RepeatedCompositeFieldContainer[SnapshotLocation]
    lost_reason: str
    def __init__(self, locations: _Optional[_Iterable[_Union[SnapshotLocation, _Mapping]]] = ..., lost_reason: _Optional[str] = ...) -> None: ...

class DrainAgentRequest(_message.Message):
    __slots__ = ("node", "undo")
    NODE_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    node: str
    undo: bool
    def __init__(self, node: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class DrainAgentResponse(_message.Message):
    __slots__ = ("status", "unchanged")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    status: DrainStatus
    unchanged: bool
    def __init__(self, status: _Optional[_Union[DrainStatus, _Mapping]] = ..., unchanged: _Optional[bool] = ...) -> None: ...

class GetDrainStatusRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class GetDrainStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: DrainStatus
    def __init__(self, status: _Optional[_Union[DrainStatus, _Mapping]] = ...) -> None: ...

class DrainStatus(_message.Message):
    __slots__ = ("node", "alive", "draining", "drained", "fragment_sets_held", "ranks_owned", "ranks_protected", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_SETS_HELD_FIELD_NUMBER: _ClassVar[int]
    RANKS_OWNED_FIELD_NUMBER: _ClassVar[int]
    RANKS_PROTECTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    alive: bool
    draining: bool
    drained: bool
    fragment_sets_held: int
    ranks_owned: int
    ranks_protected: int
    reason: str
    def __init__(self, node: _Optional[str] = ..., alive: _Optional[bool] = ..., draining: _Optional[bool] = ..., drained: _Optional[bool] = ..., fragment_sets_held: _Optional[int] = ..., ranks_owned: _Optional[int] = ..., ranks_protected: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ClusterReleaseJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ClusterReleaseJobResponse(_message.Message):
    __slots__ = ("generation", "nodes_holding")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NODES_HOLDING_FIELD_NUMBER: _ClassVar[int]
    generation: int
    nodes_holding: int
    def __init__(self, generation: _Optional[int] = ..., nodes_holding: _Optional[int] = ...) -> None: ...
