"""Merging ranks' write results into DCP's global Metadata: dedup, tiling, and precise refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from memckpt.agent.dcp_metadata import ItemKind, RankWriteResult, WrittenFile, WrittenItem, merge_results
from memckpt.errors import InvalidRequest


def _chunk(fqn: str, size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], crc: int = 1) -> WrittenItem:
    return WrittenItem(
        fqn=fqn,
        path=tuple(fqn.split(".")),
        kind=ItemKind.SHARD,
        file="",
        offset=0,
        length=100 + 4 * math.prod(sizes),
        crc32c=crc,
        dtype="float32",
        size=size,
        chunk_offsets=offsets,
        chunk_sizes=sizes,
    )


def _plain(fqn: str, crc: int = 7) -> WrittenItem:
    return WrittenItem(
        fqn=fqn, path=tuple(fqn.split(".")), kind=ItemKind.TENSOR, file="", offset=0, length=50, crc32c=crc,
        dtype="int64", size=(2,), chunk_offsets=(0,), chunk_sizes=(2,),
    )  # fmt: skip


def _value(fqn: str, crc: int = 9) -> WrittenItem:
    return WrittenItem(fqn=fqn, path=tuple(fqn.split(".")), kind=ItemKind.BYTES, file="", offset=0, length=30, crc32c=crc)


def _result(rank: int, *items: WrittenItem) -> RankWriteResult:
    """Items laid back to back in the rank's one file."""
    name, placed, at = f"__{rank}_0.distcp", [], 0
    for item in items:
        placed.append(WrittenItem(**{**_fields(item), "file": name, "offset": at}))
        at += item.length
    return RankWriteResult(rank=rank, files=(WrittenFile(name=name, size_bytes=at),), items=tuple(placed))


def _fields(item: WrittenItem) -> dict[str, object]:
    return {name: getattr(item, name) for name in WrittenItem.__slots__}


def _two_ranks(crc1: int = 7) -> list[RankWriteResult]:
    return [
        _result(0, _chunk("model.w", (4, 2), (0, 0), (2, 2)), _plain("rng.torch"), _value("step")),
        _result(1, _chunk("model.w", (4, 2), (2, 0), (2, 2)), _plain("rng.torch", crc=crc1), _value("step")),
    ]


def test_shards_are_merged_and_replicated_items_kept_once_from_the_lowest_rank() -> None:
    merged = merge_results(_two_ranks(), world_size=2, checkpoint_id="/ckpt")
    md = merged.metadata
    w = md.state_dict_metadata["model.w"]
    assert isinstance(w, TensorStorageMetadata) and w.size == torch.Size([4, 2]) and w.properties.dtype == torch.float32
    assert [tuple(c.offsets) for c in w.chunks] == [(0, 0), (2, 0)]
    assert isinstance(md.state_dict_metadata["step"], BytesStorageMetadata)
    assert md.storage_data[MetadataIndex("model.w", (2, 0))].relative_path == "__1_0.distcp"
    assert md.storage_data[MetadataIndex("rng.torch", (0,))].relative_path == "__0_0.distcp"
    assert md.storage_data[MetadataIndex("step")].relative_path == "__0_0.distcp"
    assert md.planner_data["model.w"] == ("model", "w")
    assert merged.divergent == ()
    assert merged.unreferenced_bytes == 50 + 30  # rank 1's copies of rng.torch and step


def test_replicated_copies_that_differ_are_reported() -> None:
    merged = merge_results(_two_ranks(crc1=8), world_size=2, checkpoint_id="/ckpt")
    assert merged.divergent == ("rng.torch",)


def test_index_hints_are_the_chunk_positions() -> None:
    md = merge_results(_two_ranks(), world_size=2, checkpoint_id="/ckpt").metadata
    hints = {key.offset: key.index for key in md.storage_data if key.fqn == "model.w"}
    assert hints == {torch.Size([0, 0]): 0, torch.Size([2, 0]): 1}


@pytest.mark.parametrize(
    "ranks,world_size,message",
    [
        ([0], 2, "ranks 1 of 2 have not written their files"),
        ([0, 0, 1], 2, "rank 0 has two write results"),
        ([0, 1, 2], 2, r"rank 2 is outside 0\.\.1"),
        ([], 0, "world size 0 is not positive"),
    ],
)
def test_the_set_of_ranks_must_be_exactly_the_world(ranks: list[int], world_size: int, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        merge_results([_result(r, _value("step")) for r in ranks], world_size=world_size, checkpoint_id="/ckpt")


def test_a_gap_names_the_ranks_that_wrote_no_chunk() -> None:
    results = [_result(0, _chunk("w", (4, 2), (0, 0), (2, 2))), _result(1, _value("step"))]
    with pytest.raises(InvalidRequest, match=r"tensor 'w' \[4, 2\]: chunks cover 4 of 8 elements; no chunk from ranks 1"):
        merge_results(results, world_size=2, checkpoint_id="/ckpt")


def test_overlapping_chunks_are_refused() -> None:
    results = [_result(0, _chunk("w", (4, 2), (0, 0), (3, 2))), _result(1, _chunk("w", (4, 2), (2, 0), (2, 2)))]
    with pytest.raises(
        InvalidRequest, match=r"chunk \[3, 2\] at \[0, 0\] \(rank 0\) overlaps chunk \[2, 2\] at \[2, 0\] \(rank 1\)"
    ):
        merge_results(results, world_size=2, checkpoint_id="/ckpt")


def test_a_chunk_outside_the_tensor_is_refused() -> None:
    results = [_result(0, _chunk("w", (4, 2), (0, 0), (2, 2))), _result(1, _chunk("w", (4, 2), (3, 0), (2, 2)))]
    with pytest.raises(InvalidRequest, match=r"chunk \[2, 2\] at \[3, 0\] \(rank 1\) lies outside it"):
        merge_results(results, world_size=2, checkpoint_id="/ckpt")


def test_two_sizes_at_one_offset_are_refused() -> None:
    results = [_result(0, _chunk("w", (4, 2), (0, 0), (4, 2))), _result(1, _chunk("w", (4, 2), (0, 0), (2, 2)))]
    with pytest.raises(InvalidRequest, match=r"rank 0 wrote \[4, 2\] there"):
        merge_results(results, world_size=2, checkpoint_id="/ckpt")


def test_ranks_that_disagree_on_a_tensor_are_refused() -> None:
    other = WrittenItem(**{**_fields(_chunk("w", (4, 2), (2, 0), (2, 2))), "dtype": "bfloat16"})
    results = [_result(0, _chunk("w", (4, 2), (0, 0), (2, 2))), _result(1, other)]
    with pytest.raises(InvalidRequest, match=r"key 'w' of rank 1 is bfloat16 \[4, 2\]; a lower rank wrote float32 \[4, 2\]"):
        merge_results(results, world_size=2, checkpoint_id="/ckpt")
    with pytest.raises(InvalidRequest, match="bytes item; a lower rank stored it as the other kind"):
        merge_results([_result(0, _plain("x")), _result(1, _value("x"))], world_size=2, checkpoint_id="/ckpt")


def test_results_round_trip_through_json() -> None:
    for result in _two_ranks():
        assert RankWriteResult.from_json(json.loads(json.dumps(result.to_json()))) == result


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda raw: raw["files"][0].update(name="../../etc/passwd"), "expected __0_<n>.distcp"),
        (lambda raw: raw["files"][0].update(name="__1_0.distcp"), "expected __0_<n>.distcp"),
        (lambda raw: raw["items"][0].update(offset=10**9), "lies at bytes 1000000000"),
        (lambda raw: raw["items"][0].update(kind="nope"), "malformed rank write result"),
        (lambda raw: raw["items"][0].update(length="5"), "malformed rank write result"),
        (lambda raw: raw.update(format=99), "format 99 is not 1"),
    ],
)
def test_a_bad_result_from_the_wire_is_refused(change: object, message: str) -> None:
    raw = _two_ranks()[0].to_json()
    change(raw)  # type: ignore[operator]
    with pytest.raises(InvalidRequest, match=message):
        RankWriteResult.from_json(raw)
