from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from memckpt.errors import InvalidRequest
from memckpt.trainer.layout import compute_layout
from memckpt.trainer.state import rng_state, set_rng_state
from memckpt.trainer.tree import decode_meta, encode_meta, fill, flatten


def roundtrip(state: dict, target: dict) -> dict:
    """Stores `state` into a byte buffer as a snapshot would, then fills `target` from it."""
    flat = flatten(state)
    layout = compute_layout(flat.specs)
    buffer = torch.zeros(layout.size_bytes, dtype=torch.uint8)
    for tensor, place in zip(flat.tensors, layout.placements):
        buffer[place.offset : place.offset + place.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    raw = decode_meta(encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes))

    def stored(i: int) -> torch.Tensor:
        e = raw["tensors"][i]
        return buffer[e["offset"] : e["offset"] + e["nbytes"]].view(getattr(torch, e["dtype"])).view(tuple(e["shape"]))

    for live, src in fill(target, raw["tree"], stored):
        live.copy_(src)
    return target


def test_state_round_trips_in_place_with_values_and_missing_keys() -> None:
    state = {
        "w": torch.randn(4, 3),
        "ids": torch.arange(5),
        "half": torch.randn(3).half(),
        "step": 7,
        "lr": 0.1,
        "name": "x",
        "flag": True,
        "none": None,
        "raw": b"\x00\xff",
        "nested": {"a": [1, torch.ones(2)], 3: (4, 5.5)},
        "np": np.arange(6, dtype=np.int32),
    }
    target = {"w": torch.zeros(4, 3), "ids": torch.zeros(5, dtype=torch.int64), "half": torch.zeros(3).half(), "nested": {}}
    w = target["w"]
    out = roundtrip(state, target)
    assert out["w"] is w and torch.equal(w, state["w"]), "tensors must be filled in place"
    assert torch.equal(out["ids"], state["ids"]) and torch.equal(out["half"], state["half"])
    assert (out["step"], out["lr"], out["name"], out["flag"], out["none"], out["raw"]) == (7, 0.1, "x", True, None, b"\x00\xff")
    assert out["nested"]["a"][0] == 1 and torch.equal(out["nested"]["a"][1], torch.ones(2))
    assert out["nested"][3] == (4, 5.5)
    assert np.array_equal(out["np"], state["np"])


def test_shape_mismatch_is_refused_with_the_path() -> None:
    with pytest.raises(InvalidRequest, match="/w"):
        roundtrip({"w": torch.randn(4)}, {"w": torch.zeros(5)})


def test_unsupported_leaf_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="/obj"):
        flatten({"obj": object()})


def test_rng_states_round_trip_through_a_snapshot() -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restored = roundtrip({"rng": saved}, {})
    set_rng_state(restored["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
