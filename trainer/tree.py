"""A training state as a tree: its tensor leaves, and a JSON description of everything else.

`flatten` turns a nested dict/list/tuple of tensors, DTensors, numpy arrays and plain
values into (description, tensors); `fill` walks a stored description against a live
state and writes the stored values into it, in place wherever the state has a tensor.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from memckpt.errors import InvalidRequest
from memckpt.trainer.layout import LeafSpec

FORMAT = 1
_VALUE_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True, slots=True)
class Flat:
    """A flattened state. `tensors` alias the live state: copy them before it changes."""

    tree: Any
    tensors: list[torch.Tensor]
    specs: tuple[LeafSpec, ...]
    dtensors: list[dict[str, Any] | None]


def flatten(state: Any) -> Flat:
    """The state's tensor leaves (a DTensor's local shard) and the description of the rest.

    It runs on the training thread at every snapshot, over hundreds of leaves: no work per node
    beyond the type test and the leaf (a node's path is spelled out only for an error).
    """
    tensors: list[torch.Tensor] = []
    dtensors: list[dict[str, Any] | None] = []

    def walk(obj: Any, at: _At) -> Any:
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, DTensor):
                tensors.append(_local_shard(obj))
                dtensors.append(_dtensor_info(obj))
                return {"dtensor": len(tensors) - 1}
            tensors.append(obj.detach() if obj.requires_grad else obj)
            dtensors.append(None)
            return {"tensor": len(tensors) - 1}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if not isinstance(key, (str, int)):
                    raise InvalidRequest(f"state key {key!r} at {_path(at)} is not a str or int")
                items.append([key, walk(value, (at, key))])
            return {"dict": items}
        if isinstance(obj, (list, tuple)):
            kind = "list" if isinstance(obj, list) else "tuple"
            return {kind: [walk(v, (at, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, _VALUE_TYPES):
            return {"value": obj}
        if isinstance(obj, np.ndarray):
            tensors.append(torch.from_numpy(np.ascontiguousarray(obj)))
            dtensors.append(None)
            return {"ndarray": len(tensors) - 1}
        if isinstance(obj, bytes):
            return {"bytes": base64.b64encode(obj).decode()}
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return {"value": obj.item()}
        raise InvalidRequest(f"state leaf at {_path(at)} has unsupported type {type(obj).__name__}")

    tree = walk(state, None)
    specs = tuple(LeafSpec(dtype=_dtype_name(t.dtype), shape=tuple(t.shape), itemsize=t.element_size()) for t in tensors)
    return Flat(tree=tree, tensors=tensors, specs=specs, dtensors=dtensors)


_At = tuple[Any, str | int] | None  # where a node is: (where its parent is, its key), None at the root


def _path(at: _At) -> str:
    keys: list[str] = []
    while at is not None:
        at, key = at
        keys.append(str(key))
    return "/" + "/".join(reversed(keys))


def _local_shard(tensor: DTensor) -> torch.Tensor:
    """A DTensor's local shard, without autograd: `to_local()` goes through an autograd
    function, 30 times the cost, and a snapshot takes hundreds of them."""
    local = getattr(tensor, "_local_tensor", None)
    if not isinstance(local, torch.Tensor):  # a torch that keeps it elsewhere
        local = tensor.to_local()
    return local.detach() if local.requires_grad else local


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def encode_meta(flat: Flat, offsets: list[int], size_bytes: int, world_size: int = 0) -> bytes:
    """The JSON the agent stores beside a slot: tree, tensor table, layout size, and the job's
    world size (0: not said): a job restarted at another size cannot load this snapshot's shards."""
    table = [
        {"dtype": s.dtype, "shape": list(s.shape), "offset": o, "nbytes": s.nbytes, **({"dtensor": d} if d else {})}
        for s, o, d in zip(flat.specs, offsets, flat.dtensors)
    ]
    head = {"format": FORMAT, "size_bytes": size_bytes, **({"world_size": world_size} if world_size else {})}
    return json.dumps({**head, "tree": flat.tree, "tensors": table}).encode()


def decode_meta(meta: bytes) -> dict[str, Any]:
    try:
        raw: dict[str, Any] = json.loads(meta)
    except ValueError as exc:
        raise InvalidRequest(f"snapshot metadata is not JSON: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise InvalidRequest(f"snapshot metadata format {raw.get('format')!r} is not {FORMAT}")
    return raw


StoredTensor = Callable[[int], torch.Tensor]


Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def fill(state: dict[str, Any], tree: dict[str, Any], stored: StoredTensor) -> Pairs:
    """Writes a stored tree into `state`; `stored(i)` returns tensor i (aliasing the slot).

    Plain values and tensors the state lacks are set at once; for every tensor the state
    has, returns a (live, stored) pair that the caller must copy to finish the restore.
    """
    if not isinstance(state, dict) or "dict" not in tree:
        raise InvalidRequest("restore needs a dict state and a dict snapshot")
    pairs: Pairs = []
    _fill(state, tree, stored, "", pairs)
    return pairs


def live_tensors(state: Any, tree: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Stored tensor index -> the tensor of `state` that `fill` would copy it into (a DTensor's
    local shard), for the stored tensors that have one; `state` is not changed. Whether the
    shapes and dtypes agree is the caller's to check (`fill` refuses where they do not)."""
    found: dict[int, torch.Tensor] = {}

    def walk(live: Any, node: dict[str, Any]) -> None:
        ((kind, body),) = node.items()
        if kind in ("tensor", "dtensor"):
            target = _local_shard(live) if isinstance(live, DTensor) else live
            if isinstance(target, torch.Tensor) and (kind == "tensor" or isinstance(live, DTensor)):
                found[body] = target
        elif kind == "dict" and isinstance(live, dict):
            for key, child in body:
                walk(live.get(key), child)
        elif kind in ("list", "tuple") and isinstance(live, (list, tuple)) and len(live) == len(body):
            for item, child in zip(live, body):
                walk(item, child)

    if isinstance(state, dict) and isinstance(tree, dict) and "dict" in tree:
        walk(state, tree)
    return found


def _fill(live: Any, node: dict[str, Any], stored: StoredTensor, path: str, pairs: Pairs) -> Any:
    ((kind, body),) = node.items()
    if kind in ("tensor", "ndarray", "dtensor"):
        return _fill_tensor(live, kind, stored(body), path, pairs)
    if kind == "dict":
        target = live if isinstance(live, dict) else {}
        for key, child in body:
            target[key] = _fill(target.get(key), child, stored, f"{path}/{key}", pairs)
        return target
    if kind in ("list", "tuple"):
        same = isinstance(live, (list, tuple)) and len(live) == len(body)
        items = [_fill(live[i] if same else None, c, stored, f"{path}/{i}", pairs) for i, c in enumerate(body)]
        if kind == "list" and isinstance(live, list) and same:
            live[:] = items
            return live
        return items if kind == "list" else tuple(items)
    if kind == "bytes":
        return base64.b64decode(body)
    if kind == "value":
        return body
    raise InvalidRequest(f"snapshot has an unknown node kind {kind!r} at {path or '/'}")


def _fill_tensor(live: Any, kind: str, src: torch.Tensor, path: str, pairs: Pairs) -> Any:
    if kind == "ndarray":
        if isinstance(live, np.ndarray) and live.shape == tuple(src.shape) and live.flags.writeable:
            np.copyto(live, src.numpy())
            return live
        return src.numpy().copy()
    target = _local_shard(live) if isinstance(live, DTensor) else live
    if kind == "dtensor" and not isinstance(live, DTensor):
        raise InvalidRequest(f"snapshot holds a DTensor shard at {path}; the state must hold that DTensor to restore it")
    if not isinstance(target, torch.Tensor):
        return src.clone()
    if target.shape != src.shape or target.dtype != src.dtype:
        raise InvalidRequest(
            f"state at {path} is {target.dtype} {tuple(target.shape)} but the snapshot holds {src.dtype} {tuple(src.shape)}"
        )
    pairs.append((target, src))
    return live


_DTENSOR_INFO: dict[tuple[Any, ...], dict[str, Any]] = {}


def _dtensor_info(tensor: DTensor) -> dict[str, Any]:
    """Sharding metadata of a DTensor's local shard, for resharding readers.

    Cached: it depends only on the global shape, the placements and the mesh, which do not
    change from one snapshot to the next, and computing it is most of a snapshot's CPU time.
    """
    key = (tuple(tensor.shape), tuple(tensor.placements), id(tensor.device_mesh))
    info = _DTENSOR_INFO.get(key)
    if info is None:
        info = _DTENSOR_INFO[key] = _compute_dtensor_info(tensor)
    return info


def _compute_dtensor_info(tensor: DTensor) -> dict[str, Any]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = tensor.device_mesh
    _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, tensor.placements)
    return {
        "global_shape": list(tensor.shape),
        "global_offset": list(offset),
        "placements": [str(p) for p in tensor.placements],
        "mesh_shape": list(mesh.shape),
    }
