"""Restoring a rank from a complete checkpoint on the filesystem (the last step of the cascade).

At the world size it was written with, the rank reads its own snapshot back exactly
(`agent/dcp_restore.py`: its items straight from the file, each crc32c-checked), so per-rank
values such as RNG states come back as this rank had them; that is also faster than stock
`dcp.load`, which plans reads for every item of every rank. At another world size, stock
`dcp.load` reshards the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from memckpt.agent.dcp import snapshot_meta_name
from memckpt.agent.dcp_restore import read_rank_snapshot
from memckpt.errors import InvalidRequest
from memckpt.trainer.tree import Pairs, decode_meta, fill

EXACT = "exact"  # this rank's own snapshot, byte for byte
RESHARDED = "resharded"  # stock dcp.load into this world size


def load_persisted(
    state: dict[str, Any], path: Path, rank: int, world_size: int, copy: Callable[[Pairs], None] | None = None
) -> str:
    """Fills `state` in place from the complete checkpoint at `path`; returns EXACT or RESHARDED.

    `copy` finishes the restore from (live, stored) tensor pairs (default: one thread).
    Raises whatever reading raises (NotFound, CorruptSnapshot, OSError, DCP's errors).
    """
    meta_path = path / snapshot_meta_name(rank)
    raw = decode_meta(meta_path.read_bytes()) if meta_path.exists() else None
    if raw is None or raw.get("world_size") != world_size:
        with warnings.catch_warnings():  # no process group on purpose: each rank reads what it needs
            warnings.filterwarnings("ignore", message=r"torch.distributed is (disabled, )?unavailable")
            dcp_load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
        return RESHARDED
    table = raw["tensors"]
    staged: dict[int, torch.Tensor] = {}  # snapshot offset -> the tensor fill() gets for that entry

    def stored(i: int) -> torch.Tensor:
        entry = table[i]
        if entry["offset"] + entry["nbytes"] > raw["size_bytes"]:
            raise InvalidRequest(f"persisted tensor {i} lies outside the snapshot's {raw['size_bytes']} bytes")
        tensor = torch.empty(tuple(entry["shape"]), dtype=getattr(torch, entry["dtype"]))  # untouched until read
        staged[entry["offset"]] = tensor
        return tensor

    pairs = fill(state, raw["tree"], stored)
    # the bytes of a tensor the state has go straight into it when its memory is plain; the
    # rest land in the staged tensor (kept by the state, or copied into it below)
    direct = {id(src): live for live, src in pairs if _plain_twin(live, src)}
    targets = {offset: direct.get(id(tensor), tensor) for offset, tensor in staged.items()}

    def place(offset: int, nbytes: int) -> memoryview:
        target = targets.get(offset)
        if target is None:
            raise InvalidRequest(f"persisted bytes at {offset} belong to no tensor of the snapshot's table")
        if target.nbytes != nbytes:
            raise InvalidRequest(f"persisted tensor at {offset} has {nbytes} bytes; its entry says {target.nbytes}")
        raw = target.detach().reshape(-1).view(torch.uint8)  # detached: the same memory, outside autograd
        return memoryview(raw.numpy())  # type: ignore[arg-type]  # ndarray is a buffer

    read_rank_snapshot(path, rank, place=place)
    rest = [(live, src) for live, src in pairs if id(src) not in direct]
    if copy is not None:
        copy(rest)
    else:
        for live, saved in rest:
            live.copy_(saved)
    return EXACT


def _plain_twin(live: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether `live` can take `stored`'s bytes as they are: same dtype and shape, contiguous, in CPU memory."""
    return live.device.type == "cpu" and live.dtype == stored.dtype and live.shape == stored.shape and live.is_contiguous()
