"""write_rank / finalize / verify on a real directory: stock DCP reads the result; damage is named exactly."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from memckpt.agent.dcp import CHECKSUMS, METADATA, TokenBucket, finalize, is_complete, read_rank_results, write_rank
from memckpt.agent.dcp_restore import read_rank_snapshot
from memckpt.agent.dcp_verify import verify
from memckpt.errors import CorruptSnapshot, InvalidRequest, NotFound
from memckpt.trainer.layout import compute_layout
from memckpt.trainer.tree import encode_meta, flatten


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 33, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 33, generator=g)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w", "b"]}],
        },
        "rng": {"keys": np.arange(7, dtype=np.uint32), "cuda": [], "gauss": None},
        "step": 7,
        "blob": b"xyz",
        "empty": torch.empty(0, 4),
    }


def _zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    return None


def _snapshot(state: dict[str, Any]) -> tuple[memoryview, bytes]:
    flat = flatten(state)
    layout = compute_layout(flat.specs)
    buffer = bytearray(layout.size_bytes)
    for tensor, place in zip(flat.tensors, layout.placements):
        buffer[place.offset : place.offset + place.nbytes] = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return memoryview(buffer), encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes)


def _assert_same(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}/{i}")
    else:
        assert type(got) is type(want) and got == want, where


@pytest.fixture
def written(tmp_path: Path) -> Path:
    directory = tmp_path / "step-000000000007"
    for rank in (0, 1):  # two ranks of a replicated (unsharded) state
        write_rank(directory, rank, *_snapshot(_state()))
    finalize(directory, read_rank_results(directory, 2), world_size=2)
    return directory


def test_stock_dcp_load_gives_back_every_value(written: Path) -> None:
    want = _state()
    target = {**_zeros_like(want), "rng": {"keys": None, "cuda": None, "gauss": 1.0}, "step": 0, "blob": b""}
    dcp.load(target, storage_reader=FileSystemReader(written), no_dist=True)
    _assert_same(target, want)


def test_metadata_is_what_stock_dcp_save_writes(tmp_path: Path, written: Path) -> None:
    dcp.save(_state(), checkpoint_id=tmp_path / "stock", no_dist=True)
    stock = pickle.loads((tmp_path / "stock" / METADATA).read_bytes())
    ours = pickle.loads((written / METADATA).read_bytes())
    assert ours.state_dict_metadata == stock.state_dict_metadata
    assert ours.planner_data == stock.planner_data
    assert set(ours.storage_data) == set(stock.storage_data)
    assert {info.relative_path for info in ours.storage_data.values()} == {"__0_0.distcp"}  # rank 1's copies unused


def test_verify_passes_an_intact_checkpoint_and_reads_every_byte(written: Path) -> None:
    report = verify(written)
    assert report.is_ok, report.problems
    assert report.checked_bytes == sum((written / f"__{r}_0.distcp").stat().st_size for r in (0, 1))
    assert not [p for p in written.iterdir() if p.name.endswith(".tmp")]


def test_verify_names_the_corrupt_item(written: Path) -> None:
    results = read_rank_results(written, 2)
    item = next(i for i in results[1].items if i.fqn == "optim.state.w.exp_avg")
    with open(written / "__1_0.distcp", "r+b") as f:
        f.seek(item.offset + item.length - 3)
        byte = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    (problem,) = verify(written).problems
    assert problem.startswith(
        f"rank 1: key 'optim.state.w.exp_avg' (bytes {item.offset}..{item.offset + item.length} of __1_0.distcp)"
    )


def test_verify_names_truncated_and_missing_files_and_an_unfinished_checkpoint(written: Path) -> None:
    size = (written / "__1_0.distcp").stat().st_size
    os.truncate(written / "__1_0.distcp", size - 10)
    assert verify(written).problems == (f"rank 1: file __1_0.distcp is {size - 10} bytes; {size} were written",)
    (written / "__0_0.distcp").unlink()
    problems = verify(written).problems
    assert "file __0_0.distcp is missing" in problems and "rank 0: file __0_0.distcp is missing" in problems
    (written / METADATA).unlink()
    report = verify(written)
    assert not report.complete and not is_complete(written)
    assert report.problems[0].startswith("no .metadata (the checkpoint was never finalized); files present: __0.memckpt.json")


def test_verify_notices_a_metadata_that_is_not_these_files(written: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_rank(other, 0, *_snapshot({"x": torch.ones(3)}))
    finalize(other, read_rank_results(other, 1), world_size=1)
    (written / CHECKSUMS).write_bytes((other / CHECKSUMS).read_bytes())
    (problem,) = verify(written).problems
    assert problem.startswith(f"{CHECKSUMS} is unusable or disagrees with {METADATA}: they describe different keys")


def test_finalize_refuses_a_missing_rank_a_short_file_and_a_second_finalize(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    result = write_rank(directory, 0, *_snapshot(_state()))
    with pytest.raises(NotFound, match=r"ranks \[1\] of 2 have not finished writing"):
        read_rank_results(directory, 2)
    with pytest.raises(InvalidRequest, match="ranks 1 of 2 have not written their files"):
        finalize(directory, [result], world_size=2)
    os.truncate(directory / "__0_0.distcp", 100)
    with pytest.raises(CorruptSnapshot, match=f"rank 0's file __0_0.distcp is 100 bytes; it wrote {result.size_bytes}"):
        finalize(directory, [result], world_size=1)
    assert not is_complete(directory)
    result = write_rank(directory, 0, *_snapshot(_state()))  # a rewrite truncates and starts over
    finalize(directory, [result], world_size=1)
    with pytest.raises(InvalidRequest, match="already complete"):
        finalize(directory, [result], world_size=1)
    with pytest.raises(InvalidRequest, match="already complete; rank 0 cannot be rewritten"):
        write_rank(directory, 0, *_snapshot(_state()))


def test_an_aborted_write_leaves_no_rank_result(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_rank(tmp_path / "ckpt", 0, *_snapshot(_state()), progress=progress)
    assert not (tmp_path / "ckpt" / "__0.memckpt.json").exists()
    assert seen[0][1] == sum(t.nbytes for t in flatten(_state()).tensors if t.dtype != torch.uint32)


def test_throttle_sees_every_byte_written(tmp_path: Path) -> None:
    class Counting:
        total = 0

        def wait(self, size_bytes: int) -> None:
            Counting.total += size_bytes

    result = write_rank(tmp_path / "ckpt", 0, *_snapshot(_state()), throttle=Counting(), fsync=False)
    assert Counting.total == result.size_bytes


def test_token_bucket_sleeps_off_what_exceeds_the_rate() -> None:
    now, slept = [0.0], []
    bucket = TokenBucket(1000.0, burst_bytes=500, clock=lambda: now[0], sleep=slept.append)
    bucket.wait(500)
    assert slept == []
    bucket.wait(1000)
    assert slept == [1.0]
    now[0] = 2.0  # the sleep paid the debt; one more second refills 500 (the burst), not 1000
    bucket.wait(500)
    assert slept == [1.0]


def test_with_zip_crc32_every_tensor_item_is_a_valid_zip(tmp_path: Path) -> None:
    result = write_rank(tmp_path / "ckpt", 0, *_snapshot(_state()), zip_crc32=True)
    data = (tmp_path / "ckpt" / "__0_0.distcp").read_bytes()
    for item in result.items:
        archive = zipfile.ZipFile(io.BytesIO(data[item.offset : item.offset + item.length]))
        assert archive.testzip() is None, item.fqn
    finalize(tmp_path / "ckpt", [result], world_size=1)
    assert verify(tmp_path / "ckpt").is_ok


def test_memckpt_reads_back_each_ranks_exact_snapshot_even_values_dcp_keeps_once(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    snapshots = [
        _snapshot({**_state(), "rng": {"keys": np.arange(7, dtype=np.uint32) + r, "t": torch.full((3,), r)}}) for r in (0, 1)
    ]
    results = [write_rank(directory, r, *snapshots[r]) for r in (0, 1)]
    merged = finalize(directory, results, world_size=2)
    assert set(merged.divergent) == {"rng.keys", "rng.t"}  # stock dcp.load gives every rank rank 0's copy
    for rank, (buffer, meta) in enumerate(snapshots):
        restored = bytearray(len(buffer))
        assert read_rank_snapshot(directory, rank, memoryview(restored)) == meta
        assert restored == buffer


def test_memckpt_read_back_refuses_corrupt_incomplete_and_small(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    buffer, meta = _snapshot(_state())
    result = write_rank(directory, 0, buffer, meta)
    with pytest.raises(NotFound, match="is not complete"):
        read_rank_snapshot(directory, 0, memoryview(bytearray(len(buffer))))
    finalize(directory, [result], world_size=1)
    with pytest.raises(InvalidRequest, match=f"needs {len(buffer)} bytes; the buffer has 10"):
        read_rank_snapshot(directory, 0, memoryview(bytearray(10)))
    with pytest.raises(NotFound, match="no snapshot of rank 1"):
        read_rank_snapshot(directory, 1, memoryview(bytearray(len(buffer))))
    item = next(i for i in result.items if i.fqn == "model.w")
    with open(directory / "__0_0.distcp", "r+b") as f:
        f.seek(item.offset + item.length // 2)
        f.write(b"\xff\xfe")
    with pytest.raises(CorruptSnapshot, match=r"key 'model.w' \(bytes"):
        read_rank_snapshot(directory, 0, memoryview(bytearray(len(buffer))))
