from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FragmentHeader(_message.Message):
    __slots__ = ("job", "rank", "step", "generation", "fragment_index", "k", "m", "size_bytes", "fragment_bytes", "owner_node", "fragment_crc32c", "meta", "meta_crc32c", "snapshot_checksums", "kept_step", "kept_generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_NODE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_CRC32C_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    META_CRC32C_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    KEPT_STEP_FIELD_NUMBER: _ClassVar[int]
    KEPT_GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    step: int
    generation: int
    fragment_index: int
    k: int
    m: int
    size_bytes: int
    fragment_bytes: int
    owner_node: str
    fragment_crc32c: int
    meta: str
    meta_crc32c: int
    snapshot_checksums: _containers.RepeatedScalarFieldContainer[int]
    kept_step: int
    kept_generation: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., generation: _Optional[int] = ..., fragment_index: _Optional[int] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., size_bytes: _Optional[int] = ..., fragment_bytes: _Optional[int] = ..., owner_node: _Optional[str] = ..., fragment_crc32c: _Optional[int] = ..., meta: _Optional[str] = ..., meta_crc32c: _Optional[int] = ..., snapshot_checksums: _Optional[_Iterable[int]] = ..., kept_step: _Optional[int] = ..., kept_generation: _Optional[int] = ...) -> None: ...

class FragmentData(_message.Message):
    __slots__ = ("data", "data_crc32c")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_CRC32C_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    data_crc32c: int
    def __init__(self, data: _Optional[bytes] = ..., data_crc32c: _Optional[int] = ...) -> None: ...

class PutFragmentRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FragmentHeader
    chunk: FragmentData
    def __init__(self, header: _Optional[_Union[FragmentHeader, _Mapping]] = ..., chunk: _Optional[_Union[FragmentData, _Mapping]] = ...) -> None: ...

class PutFragmentResponse(_message.Message):
    __slots__ = ("stored_bytes",)
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    stored_bytes: int
    def __init__(self, stored_bytes: _Optional[int] = ...) -> None: ...

class GetFragmentRequest(_message.Message):
    __slots__ = ("job", "rank", "fragment_index", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    fragment_index: int
    step: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., fragment_index: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class FragmentChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FragmentHeader
    chunk: FragmentData
    def __init__(self, header: _Optional[_Union[FragmentHeader, _Mapping]] = ..., chunk: _Optional[_Union[FragmentData, _Mapping]] = ...) -> None: ...

class OpenTransferRequest(_message.Message):
    __slots__ = ("put", "get")
    PUT_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    put: FragmentHeader
    get: GetFragmentRequest
    def __init__(self, put: _Optional[_Union[FragmentHeader, _Mapping]] = ..., get: _Optional[_Union[GetFragmentRequest, _Mapping]] = ...) -> None: ...

class OpenTransferResponse(_message.Message):
    __slots__ = ("port", "ticket", "header")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    header: FragmentHeader
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ..., header: _Optional[_Union[FragmentHeader, _Mapping]] = ...) -> None: ...
