from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_STATE_UNSPECIFIED: _ClassVar[SlotState]
    SLOT_STATE_FREE: _ClassVar[SlotState]
    SLOT_STATE_WRITING: _ClassVar[SlotState]
    SLOT_STATE_COMMITTED: _ClassVar[SlotState]
SLOT_STATE_UNSPECIFIED: SlotState
SLOT_STATE_FREE: SlotState
SLOT_STATE_WRITING: SlotState
SLOT_STATE_COMMITTED: SlotState

class RegisterRankRequest(_message.Message):
    __slots__ = ("job", "rank", "world_size", "slot_size_bytes", "generation", "run_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SLOT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    slot_size_bytes: int
    generation: int
    run_id: str
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., slot_size_bytes: _Optional[int] = ..., generation: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class RegisterRankResponse(_message.Message):
    __slots__ = ("slot_size_bytes", "has_committed", "committed_step")
    SLOT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    slot_size_bytes: int
    has_committed: bool
    committed_step: int
    def __init__(self, slot_size_bytes: _Optional[int] = ..., has_committed: _Optional[bool] = ..., committed_step: _Optional[int] = ...) -> None: ...

class BeginSnapshotRequest(_message.Message):
    __slots__ = ("job", "rank", "step", "size_bytes", "generation", "run_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    size_bytes: int
    generation: int
    run_id: str
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., size_bytes: _Optional[int] = ..., generation: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class BeginSnapshotResponse(_message.Message):
    __slots__ = ("slot_index", "slot_name", "slot_size_bytes")
    SLOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLOT_NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    slot_index: int
    slot_name: str
    slot_size_bytes: int
    def __init__(self, slot_index: _Optional[int] = ..., slot_name: _Optional[str] = ..., slot_size_bytes: _Optional[int] = ...) -> None: ...

class CommitSnapshotRequest(_message.Message):
    __slots__ = ("job", "rank", "step", "slot_index", "data_size_bytes", "meta", "generation", "run_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SLOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    slot_index: int
    data_size_bytes: int
    meta: bytes
    generation: int
    run_id: str
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., slot_index: _Optional[int] = ..., data_size_bytes: _Optional[int] = ..., meta: _Optional[bytes] = ..., generation: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class CommitSnapshotResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("job", "rank")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("steps", "slot_names", "persisted_steps", "persisted_dir", "world_sizes")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SLOT_NAMES_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_DIR_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZES_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    slot_names: _containers.RepeatedScalarFieldContainer[str]
    persisted_steps: _containers.RepeatedScalarFieldContainer[int]
    persisted_dir: str
    world_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., slot_names: _Optional[_Iterable[str]] = ..., persisted_steps: _Optional[_Iterable[int]] = ..., persisted_dir: _Optional[str] = ..., world_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenRestoreRequest(_message.Message):
    __slots__ = ("job", "rank", "step", "direct_ok")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DIRECT_OK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    direct_ok: bool
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., direct_ok: _Optional[bool] = ...) -> None: ...

class DirectFragment(_message.Message):
    __slots__ = ("index", "host", "port", "ticket", "fragment_bytes", "node")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    index: int
    host: str
    port: int
    ticket: bytes
    fragment_bytes: int
    node: str
    def __init__(self, index: _Optional[int] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., ticket: _Optional[bytes] = ..., fragment_bytes: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class OpenRestoreResponse(_message.Message):
    __slots__ = ("step", "slot_name", "slot_size_bytes", "data_size_bytes", "meta", "checksums", "source", "direct")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SLOT_NAME_FIELD_NUMBER: _ClassVar[int]
    SLOT_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    step: int
    slot_name: str
    slot_size_bytes: int
    data_size_bytes: int
    meta: bytes
    checksums: _containers.RepeatedScalarFieldContainer[int]
    source: str
    direct: _containers.RepeatedCompositeFieldContainer[DirectFragment]
    def __init__(self, step: _Optional[int] = ..., slot_name: _Optional[str] = ..., slot_size_bytes: _Optional[int] = ..., data_size_bytes: _Optional[int] = ..., meta: _Optional[bytes] = ..., checksums: _Optional[_Iterable[int]] = ..., source: _Optional[str] = ..., direct: _Optional[_Iterable[_Union[DirectFragment, _Mapping]]] = ...) -> None: ...

class ReleaseJobRequest(_message.Message):
    __slots__ = ("job", "local_only")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    job: str
    local_only: bool
    def __init__(self, job: _Optional[str] = ..., local_only: _Optional[bool] = ...) -> None: ...

class ReleaseJobResponse(_message.Message):
    __slots__ = ("ranks_released", "bytes_released", "cluster_wide", "nodes_holding")
    RANKS_RELEASED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_WIDE_FIELD_NUMBER: _ClassVar[int]
    NODES_HOLDING_FIELD_NUMBER: _ClassVar[int]
    ranks_released: int
    bytes_released: int
    cluster_wide: bool
    nodes_holding: int
    def __init__(self, ranks_released: _Optional[int] = ..., bytes_released: _Optional[int] = ..., cluster_wide: _Optional[bool] = ..., nodes_holding: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SlotStatus(_message.Message):
    __slots__ = ("index", "name", "state", "step", "size_bytes", "data_size_bytes", "checksum_ready")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_READY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    state: SlotState
    step: int
    size_bytes: int
    data_size_bytes: int
    checksum_ready: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., state: _Optional[_Union[SlotState, str]] = ..., step: _Optional[int] = ..., size_bytes: _Optional[int] = ..., data_size_bytes: _Optional[int] = ..., checksum_ready: _Optional[bool] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("job", "rank", "world_size", "has_committed", "committed_step", "slots", "restored_from", "restored_step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESTORED_STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    world_size: int
    has_committed: bool
    committed_step: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotStatus]
    restored_from: str
    restored_step: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., has_committed: _Optional[bool] = ..., committed_step: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotStatus, _Mapping]]] = ..., restored_from: _Optional[str] = ..., restored_step: _Optional[int] = ...) -> None: ...

class PersistStatus(_message.Message):
    __slots__ = ("job", "complete_step", "writing_step", "written_bytes", "failures", "last_error")
    JOB_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_STEP_FIELD_NUMBER: _ClassVar[int]
    WRITING_STEP_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    job: str
    complete_step: int
    writing_step: int
    written_bytes: int
    failures: int
    last_error: str
    def __init__(self, job: _Optional[str] = ..., complete_step: _Optional[int] = ..., writing_step: _Optional[int] = ..., written_bytes: _Optional[int] = ..., failures: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("node", "memory_used_bytes", "memory_limit_bytes", "ranks", "version", "pid", "persistence", "persist_root", "metrics_address")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_FIELD_NUMBER: _ClassVar[int]
    PERSIST_ROOT_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node: str
    memory_used_bytes: int
    memory_limit_bytes: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    version: str
    pid: int
    persistence: _containers.RepeatedCompositeFieldContainer[PersistStatus]
    persist_root: str
    metrics_address: str
    def __init__(self, node: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., persistence: _Optional[_Iterable[_Union[PersistStatus, _Mapping]]] = ..., persist_root: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("job", "rank", "generation", "run_id", "restored_from", "restored_step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESTORED_STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    generation: int
    run_id: str
    restored_from: str
    restored_step: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., generation: _Optional[int] = ..., run_id: _Optional[str] = ..., restored_from: _Optional[str] = ..., restored_step: _Optional[int] = ...) -> None: ...

class AttachEvent(_message.Message):
    __slots__ = ("attached",)
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    attached: bool
    def __init__(self, attached: _Optional[bool] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("job", "rank", "generation", "run_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    generation: int
    run_id: str
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., generation: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class DetachResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
