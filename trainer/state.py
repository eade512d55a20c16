"""Gather and apply a full training state: model, optimizer, RNG states, data position, step.

The model and optimizer parts come from `torch.distributed.checkpoint.state_dict`, so they
are sharded (DTensor) under FSDP2 and keyed by parameter name; the tensors alias the live
parameters and optimizer state, which is what lets a snapshot copy them without a detour.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int, data_position: int) -> dict[str, Any]:
    """The state to snapshot. Initializes the optimizer's lazy state so it has a fixed layout."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "rng": rng_state(), "step": step, "data": data_position}


def refresh_training_state(state: dict[str, Any], *, step: int, data_position: int) -> None:
    """Updates the values that are not aliased tensors (step, data position, RNG) before a snapshot."""
    state["step"] = step
    state["data"] = data_position
    state["rng"] = rng_state()


def apply_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads a restored state into the model, the optimizer and the RNGs.

    The optimizer's state tensors are replaced: gather the state again afterwards.
    """
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_rng_state(state["rng"])
