"""The torch.save envelope around raw tensor bytes: torch.load and zip tools read it exactly."""

from __future__ import annotations

import io
import zipfile
import zlib

import pytest
import torch

from memckpt.agent.torch_zip import DATA_ALIGNMENT_BYTES, contiguous_strides, tensor_envelope

CASES = [
    (torch.float32, (3, 4)),
    (torch.bfloat16, (5,)),
    (torch.int64, ()),
    (torch.float32, (0, 64)),
    (torch.bool, (3,)),
    (torch.complex64, (2,)),
    (torch.uint8, (7, 1, 2)),
    (torch.uint32, (2, 2)),  # no legacy storage class: pickled as bytes + dtype
    (torch.float8_e4m3fn, (7,)),
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8)
    return raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape).clone()


def _archive(tensor: torch.Tensor, *, crc: bool, force_zip64: bool = False) -> bytes:
    envelope = tensor_envelope(tensor.dtype, tuple(tensor.shape), force_zip64=force_zip64)
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    crc32 = zlib.crc32(raw) if crc else 0
    blob = envelope.header_for(crc32) + raw + envelope.trailer(crc32)
    assert len(blob) == envelope.nbytes
    return blob


@pytest.mark.parametrize("force_zip64", [False, True])
@pytest.mark.parametrize("dtype,shape", CASES)
def test_torch_load_returns_the_exact_tensor(dtype: torch.dtype, shape: tuple[int, ...], force_zip64: bool) -> None:
    tensor = _tensor(dtype, shape)
    loaded = torch.load(io.BytesIO(_archive(tensor, crc=False, force_zip64=force_zip64)), weights_only=True)
    assert loaded.dtype == dtype and loaded.shape == tensor.shape
    assert loaded.reshape(-1).view(torch.uint8).tolist() == tensor.reshape(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize("dtype,shape", CASES)
def test_pickle_is_byte_identical_to_torch_save(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _tensor(dtype, shape)
    ours = zipfile.ZipFile(io.BytesIO(_archive(tensor, crc=True)))
    stock_out = io.BytesIO()
    torch.save(tensor, stock_out)
    stock = zipfile.ZipFile(stock_out)
    assert ours.read("archive/data.pkl") == stock.read("archive/data.pkl")
    assert ours.read("archive/version") == stock.read("archive/version")


@pytest.mark.parametrize("force_zip64", [False, True])
def test_with_crc_the_archive_passes_zip_tests_and_data_is_aligned(force_zip64: bool) -> None:
    tensor = _tensor(torch.float32, (33, 5))
    blob = _archive(tensor, crc=True, force_zip64=force_zip64)
    archive = zipfile.ZipFile(io.BytesIO(blob))
    assert archive.testzip() is None
    info = archive.getinfo("archive/data/0")
    assert archive.read(info) == tensor.numpy().tobytes()
    data_start = len(tensor_envelope(torch.float32, (33, 5), force_zip64=force_zip64).header)
    assert data_start % DATA_ALIGNMENT_BYTES == 0 and blob[data_start : data_start + 4] == tensor.numpy().tobytes()[:4]


def test_a_wrong_crc_is_caught_by_zip_tools() -> None:
    tensor = _tensor(torch.float32, (8,))
    envelope = tensor_envelope(torch.float32, (8,))
    blob = envelope.header_for(1234) + tensor.numpy().tobytes() + envelope.trailer(1234)
    assert zipfile.ZipFile(io.BytesIO(blob)).testzip() == "archive/data/0"


def test_contiguous_strides_match_torch() -> None:
    for shape in [(), (3,), (2, 3, 4), (0, 5), (4, 0, 2)]:
        assert contiguous_strides(shape) == torch.empty(shape).stride()
