"""Snapshot metadata -> DCP items: the same keys, paths and item kinds stock DCP derives from the live state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from memckpt.agent.dcp_plan import PlannedObject, PlannedTensor, plan_items, rebuild_object
from memckpt.errors import InvalidRequest
from memckpt.trainer.layout import compute_layout
from memckpt.trainer.tree import encode_meta, flatten


def _meta(state: dict[str, Any]) -> tuple[dict[str, Any], bytearray]:
    flat = flatten(state)
    layout = compute_layout(flat.specs)
    buffer = bytearray(layout.size_bytes)
    for tensor, place in zip(flat.tensors, layout.placements):
        buffer[place.offset : place.offset + place.nbytes] = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return json.loads(encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes)), buffer


STATES = {
    "nested": {"model": {"w": torch.ones(2, 3), "b": torch.zeros(3)}, "step": 4},
    "optimizer": {
        "optim": {
            "state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}],
        }
    },
    "lists": {"a": [torch.ones(1), 3, {"k": "v"}], "plain": [1, 2, "x"], "empty": [], "nested": [[1, 2], [torch.ones(1)]]},
    "odd_leaves": {"arr": np.arange(4, dtype=np.uint32), "t": (torch.ones(2), 1), "raw": b"ab", "none": None, 3: {"x": 1.5}},
}


@pytest.mark.parametrize("name", sorted(STATES))
def test_keys_paths_and_kinds_match_stock_flatten(name: str) -> None:
    state = STATES[name]
    meta, buffer = _meta(state)
    items = plan_items(meta, len(buffer))
    flat, mapping = flatten_state_dict(state)
    assert [i.fqn for i in items] == list(flat)
    assert {i.fqn: i.path for i in items} == mapping
    for item in items:
        assert isinstance(item, PlannedTensor) == isinstance(flat[item.fqn], torch.Tensor), item.fqn


def test_objects_are_rebuilt_with_their_types_and_tensor_values() -> None:
    state = STATES["odd_leaves"]
    meta, buffer = _meta(state)
    rebuilt = {
        i.fqn: rebuild_object(i.node, meta["tensors"], memoryview(buffer))
        for i in plan_items(meta, len(buffer))
        if isinstance(i, PlannedObject)
    }
    assert rebuilt["raw"] == b"ab" and rebuilt["none"] is None and rebuilt["3.x"] == 1.5
    assert (
        isinstance(rebuilt["arr"], np.ndarray) and rebuilt["arr"].dtype == np.uint32 and rebuilt["arr"].tolist() == [0, 1, 2, 3]
    )
    assert isinstance(rebuilt["t"], tuple) and torch.equal(rebuilt["t"][0], torch.ones(2)) and rebuilt["t"][1] == 1


def test_tensor_items_point_at_their_bytes() -> None:
    meta, buffer = _meta({"m": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}})
    (item,) = plan_items(meta, len(buffer))
    assert isinstance(item, PlannedTensor) and not item.sharded
    assert item.global_shape == item.chunk_sizes == (2, 3) and item.chunk_offsets == (0, 0)
    got = torch.frombuffer(buffer[item.buffer_offset : item.buffer_offset + item.nbytes], dtype=torch.float32)
    assert got.tolist() == list(range(6))


def test_dtensor_shards_become_chunks_of_the_global_tensor() -> None:
    meta = {
        "tree": {"dict": [["w", {"dtensor": 0}]]},
        "tensors": [
            {
                "dtype": "float32",
                "shape": [2, 4],
                "offset": 0,
                "nbytes": 32,
                "dtensor": {"global_shape": [8, 4], "global_offset": [6, 0], "placements": ["Shard(dim=0)"], "mesh_shape": [4]},
            }
        ],
    }
    (item,) = plan_items(meta, 32)
    assert isinstance(item, PlannedTensor) and item.sharded
    assert (item.global_shape, item.chunk_offsets, item.chunk_sizes) == ((8, 4), (6, 0), (2, 4))


def _one_tensor_meta(**entry: Any) -> dict[str, Any]:
    base = {"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}
    return {"tree": {"dict": [["w", {"tensor": 0}]]}, "tensors": [{**base, **entry}]}


@pytest.mark.parametrize(
    "meta,size,message",
    [
        (_one_tensor_meta(offset=8), 16, "outside the 16-byte buffer"),
        (_one_tensor_meta(nbytes=12), 16, "claims 12 bytes"),
        (_one_tensor_meta(dtype="notatype"), 16, "unknown tensor dtype"),
        (
            {"tree": {"dict": [["a.b", {"value": 1}], ["a", {"dict": [["b", {"value": 2}]]}]]}, "tensors": []},
            0,
            "same DCP key 'a.b'",
        ),
        ({"tree": {"dict": [["t", {"tuple": [{"dtensor": 0}]}]]}, "tensors": [{}]}, 0, "DTensor inside a tuple"),
        ({"tree": {"dict": [["x", {"weird": 1}]]}, "tensors": []}, 0, "unknown node kind 'weird'"),
        ({"tree": {"dict": [["x", {"tensor": 5}]]}, "tensors": []}, 0, "names tensor 5; the table has 0"),
        ({"tensors": []}, 0, "needs a dict 'tree'"),
    ],
)
def test_bad_metadata_is_refused_with_the_reason(meta: dict[str, Any], size: int, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(".", r"\.")):
        plan_items(meta, size)


def test_partial_placements_are_refused() -> None:
    meta = _one_tensor_meta()
    meta["tree"] = {"dict": [["w", {"dtensor": 0}]]}
    meta["tensors"][0]["dtensor"] = {"global_shape": [4], "global_offset": [0], "placements": ["Partial(sum)"], "mesh_shape": [2]}
    with pytest.raises(InvalidRequest, match="Partial placement"):
        plan_items(meta, 16)
