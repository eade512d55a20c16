"""The bytes `torch.save(tensor)` would write, around raw tensor data we stream ourselves. Pure logic.

`torch.load` reads a zip archive (stored, not compressed) holding a small pickle and one
record with the tensor's raw bytes. `TensorEnvelope` is everything of that archive except the
raw bytes: a header to write before them and a trailer after, so a writer can stream a
tensor from shared memory into a file without ever building the archive in memory. Data
records are 64-byte aligned as torch aligns them; sizes past 4 GiB use zip64 fields.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch

ARCHIVE = "archive"  # the record prefix torch.save uses for a file object
DATA_ALIGNMENT_BYTES = 64  # torch's `.storage_alignment`
_PICKLE_PROTOCOL = 2  # torch.save's default
_ZIP64_LIMIT = 0xFFFFFFFF
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature .. extra length: 30 bytes
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_DOS_DATE_1980 = (1 << 5) | 1  # 1980-01-01, as torch writes: archives are byte-for-byte reproducible
_ALIGN_EXTRA_ID = 0x4246  # "FB": the padding field torch.save uses to align its records

# The storage classes torch.save names in its pickle; frozen in torch (new dtypes pickle as themselves).
_LEGACY_STORAGE = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.complex128: "ComplexDoubleStorage",
    torch.complex64: "ComplexFloatStorage",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEnvelope:
    """A torch.save archive of one contiguous CPU tensor, less its `data_nbytes` raw bytes.

    Write `header_for(crc32)`, the raw bytes, then `trailer(crc32)`. The zip CRC-32 of the
    data record may be 0 (torch.load does not check it, and
    `torch.serialization.set_crc32_options(False)` writes 0 too); the real one makes the
    archive valid for every zip tool.
    """

    header: bytes
    data_nbytes: int
    crc_offset: int
    _records: tuple[tuple[str, int, int, int], ...]  # (name, local header offset, size, crc32)

    def header_for(self, crc32: int) -> bytes:
        """`header` with the data record's CRC-32 filled in."""
        return self.header[: self.crc_offset] + crc32.to_bytes(4, "little") + self.header[self.crc_offset + 4 :]

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.data_nbytes + len(self.trailer(0))

    def trailer(self, crc32: int = 0) -> bytes:
        records = (*self._records[:-1], (*self._records[-1][:3], crc32))
        return _central_directory(records, len(self.header) + self.data_nbytes)


def tensor_envelope(dtype: torch.dtype, shape: tuple[int, ...], *, force_zip64: bool = False) -> TensorEnvelope:
    """The archive torch.save writes for a contiguous CPU tensor of `dtype` and `shape`.

    `force_zip64` writes zip64 size fields even for small data (tests use it to cover them).
    """
    data_nbytes = math.prod(shape) * dtype.itemsize
    small = {
        "data.pkl": _tensor_pickle(dtype, shape),
        ".format_version": b"1",
        ".storage_alignment": str(DATA_ALIGNMENT_BYTES).encode(),
        "byteorder": b"little",
        "version": b"3\n",
    }
    out = io.BytesIO()
    records: list[tuple[str, int, int, int]] = []
    for name, body in small.items():
        offset = out.tell()
        out.write(_local_header(f"{ARCHIVE}/{name}", len(body), offset, zip64=False))
        out.write(body)
        records.append((f"{ARCHIVE}/{name}", offset, len(body), zlib.crc32(body)))
    offset = out.tell()
    zip64 = force_zip64 or data_nbytes >= _ZIP64_LIMIT
    out.write(_local_header(f"{ARCHIVE}/data/0", data_nbytes, offset, zip64=zip64))
    records.append((f"{ARCHIVE}/data/0", offset, data_nbytes, 0))
    header = out.getvalue()
    crc_offset = offset + 14  # signature, versions, flags, method, time, date
    return TensorEnvelope(header=header, data_nbytes=data_nbytes, crc_offset=crc_offset, _records=tuple(records))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


class _StorageRef:
    """Stands for the tensor's storage in the pickle; pickled as torch's persistent id."""

    def __init__(self, storage_type: Any, numel: int) -> None:
        self.storage_type = storage_type
        self.numel = numel


class _RebuildTensor:
    """Pickles as torch.save pickles a tensor: a legacy typed storage, or bytes plus the dtype."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = shape

    def __reduce__(self) -> tuple[Any, ...]:
        numel = math.prod(self.shape)
        common: tuple[Any, ...] = (0, self.shape, contiguous_strides(self.shape), False, collections.OrderedDict())
        legacy = _LEGACY_STORAGE.get(self.dtype)
        if legacy is not None:
            return (torch._utils._rebuild_tensor_v2, (_StorageRef(getattr(torch, legacy), numel), *common))
        nbytes = numel * self.dtype.itemsize
        return (torch._utils._rebuild_tensor_v3, (_StorageRef(torch.UntypedStorage, nbytes), *common, self.dtype))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, "0", "cpu", obj.numel)
        return None


def _tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=_PICKLE_PROTOCOL).dump(_RebuildTensor(dtype, tuple(shape)))
    return out.getvalue()


def _local_header(name: str, size: int, offset: int, *, zip64: bool) -> bytes:
    """A local file header whose data starts DATA_ALIGNMENT_BYTES-aligned from the archive start."""
    encoded = name.encode()
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    unpadded = offset + _LOCAL_HEADER.size + len(encoded) + len(extra) + 4
    padding = -unpadded % DATA_ALIGNMENT_BYTES
    extra += struct.pack("<HH", _ALIGN_EXTRA_ID, padding) + b"Z" * padding
    field = _ZIP64_LIMIT if zip64 else size
    version = 45 if zip64 else 20
    fixed = _LOCAL_HEADER.pack(0x04034B50, version, 0, 0, 0, _DOS_DATE_1980, 0, field, field, len(encoded), len(extra))
    return fixed + encoded + extra


def _central_directory(records: tuple[tuple[str, int, int, int], ...], directory_offset: int) -> bytes:
    out = io.BytesIO()
    for name, offset, size, crc in records:
        encoded = name.encode()
        zip64 = size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQQ", 1, 24, size, size, offset) if zip64 else b""
        size_field, offset_field = (_ZIP64_LIMIT, _ZIP64_LIMIT) if zip64 else (size, offset)
        version = 45 if zip64 else 20
        out.write(
            _CENTRAL_HEADER.pack(
                0x02014B50,
                version,
                version,
                0,
                0,
                0,
                _DOS_DATE_1980,
                crc,
                size_field,
                size_field,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                0,
                offset_field,
            )  # fmt: skip
        )
        out.write(encoded + extra)
    size = out.tell()
    end64 = directory_offset + size
    count = len(records)
    out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, directory_offset))
    out.write(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
    small_offset = min(directory_offset, _ZIP64_LIMIT)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, small_offset, 0))
    return out.getvalue()
