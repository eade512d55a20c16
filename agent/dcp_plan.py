"""What one rank's snapshot becomes in a `torch.distributed.checkpoint` (DCP) checkpoint. Pure logic.

A snapshot is a byte buffer plus the JSON of `memckpt.trainer.tree` (`tree`, `tensors`).
`plan_items` walks the tree exactly as DCP's `flatten_state_dict` walks a live state dict
(`torch.distributed.checkpoint._traverse.traverse_state_dict`): mappings are always entered,
lists only when they hold a tensor or an enterable container, and every other value is a
leaf. Its key (FQN) is the path joined by dots. Tensor leaves are stored as tensors (DTensor
shards as chunks of the global tensor); every other leaf is stored as `torch.save(value)`.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import torch

from memckpt.errors import InvalidRequest

PathItem = str | int
_CONTAINERS = ("dict", "list", "tuple")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedTensor:
    """A tensor leaf: `nbytes` contiguous bytes at `buffer_offset` of the snapshot buffer."""

    fqn: str
    path: tuple[PathItem, ...]
    dtype: str
    global_shape: tuple[int, ...]
    chunk_offsets: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    buffer_offset: int
    nbytes: int
    sharded: bool  # a DTensor's local shard (DCP's SHARD item) rather than a whole tensor


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedObject:
    """Any other leaf, stored as `torch.save(rebuild_object(node, ...))` (DCP's BYTE_IO item)."""

    fqn: str
    path: tuple[PathItem, ...]
    node: Any


PlannedItem = PlannedTensor | PlannedObject


def plan_items(meta: dict[str, Any], buffer_size_bytes: int) -> list[PlannedItem]:
    """The DCP items of a decoded snapshot metadata, in tree order.

    Raises:
        InvalidRequest: the tree is malformed, a tensor lies outside the buffer, two leaves
            flatten to one key, or a leaf cannot be stored the way stock DCP stores it.
    """
    tree, table = meta.get("tree"), meta.get("tensors")
    if not isinstance(tree, dict) or "dict" not in tree or not isinstance(table, list):
        raise InvalidRequest("snapshot metadata needs a dict 'tree' and a 'tensors' table")
    items: list[PlannedItem] = []
    seen: set[str] = set()

    def visit(path: tuple[PathItem, ...], node: dict[str, Any]) -> None:
        fqn = ".".join(map(str, path))
        if fqn in seen:
            raise InvalidRequest(f"two leaves of the state flatten to the same DCP key {fqn!r}")
        seen.add(fqn)
        kind, body = _kind(node, fqn)
        if kind in ("tensor", "dtensor"):
            items.append(_planned_tensor(fqn, path, kind, _entry(table, body, fqn), buffer_size_bytes))
        else:
            _check_rebuildable(node, fqn, table, buffer_size_bytes)
            items.append(PlannedObject(fqn=fqn, path=path, node=node))

    def walk(path: tuple[PathItem, ...], node: dict[str, Any]) -> None:
        kind, body = _kind(node, ".".join(map(str, path)))
        if kind == "dict":
            for pair in body:
                key, child = pair
                walk((*path, str(key)), child)
        elif kind == "list" and not is_terminal(node):
            for i, child in enumerate(body):
                walk((*path, i), child)
        else:
            visit(path, node)

    for key, child in tree["dict"]:
        walk((str(key),), child)
    return items


def is_terminal(node: dict[str, Any]) -> bool:
    """DCP's `_is_terminal`: a mapping never is; a list is unless it holds a tensor or an enterable container."""
    kind, body = next(iter(node.items()))
    if kind == "dict":
        return False
    if kind != "list":
        return True
    for entry in body:
        entry_kind = next(iter(entry))
        if entry_kind in ("dict", "list") and not is_terminal(entry):
            return False
        if entry_kind in ("tensor", "dtensor"):
            return False
    return True


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise InvalidRequest(f"unknown tensor dtype {name!r}")
    return dtype


def rebuild_object(node: dict[str, Any], table: list[dict[str, Any]], buffer: memoryview) -> Any:
    """The Python value of a non-tensor leaf, with tensors and arrays copied out of `buffer`."""
    kind, body = next(iter(node.items()))
    if kind == "value":
        return body
    if kind == "bytes":
        return base64.b64decode(body)
    if kind == "dict":
        return {key: rebuild_object(child, table, buffer) for key, child in body}
    if kind in ("list", "tuple"):
        values = [rebuild_object(child, table, buffer) for child in body]
        return values if kind == "list" else tuple(values)
    entry = table[body]
    dtype, shape = torch_dtype(entry["dtype"]), tuple(entry["shape"])
    raw = bytearray(buffer[entry["offset"] : entry["offset"] + entry["nbytes"]])
    tensor = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    return tensor.numpy() if kind == "ndarray" else tensor


def _kind(node: Any, where: str) -> tuple[str, Any]:
    if not isinstance(node, dict) or len(node) != 1:
        raise InvalidRequest(f"snapshot tree node at {where or '/'} is not a one-key object")
    ((kind, body),) = node.items()
    known = ("tensor", "dtensor", "ndarray", "value", "bytes", *_CONTAINERS)
    if kind not in known:
        raise InvalidRequest(f"snapshot tree has an unknown node kind {kind!r} at {where or '/'}")
    if kind in _CONTAINERS and not isinstance(body, list):
        raise InvalidRequest(f"snapshot tree node {kind!r} at {where or '/'} has no list body")
    if kind == "dict" and not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) for p in body):
        raise InvalidRequest(f"snapshot tree dict at {where or '/'} needs [key, node] pairs with str or int keys")
    return kind, body


def _entry(table: list[dict[str, Any]], index: Any, fqn: str) -> dict[str, Any]:
    if not isinstance(index, int) or not 0 <= index < len(table):
        raise InvalidRequest(f"leaf {fqn!r} names tensor {index!r}; the table has {len(table)}")
    entry = table[index]
    if not isinstance(entry, dict):
        raise InvalidRequest(f"tensor table entry {index} of {fqn!r} is not an object")
    return entry


def _planned_tensor(fqn: str, path: tuple[PathItem, ...], kind: str, entry: dict[str, Any], buffer_size: int) -> PlannedTensor:
    try:
        dtype_name, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"tensor entry of {fqn!r} lacks dtype, shape, offset or nbytes: {exc}") from exc
    dtype = torch_dtype(dtype_name)
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected or min(shape, default=0) < 0:
        raise InvalidRequest(f"tensor {fqn!r} is {dtype_name} {list(shape)} ({expected} bytes) but claims {nbytes} bytes")
    if offset < 0 or offset + nbytes > buffer_size:
        raise InvalidRequest(f"tensor {fqn!r} lies at bytes {offset}..{offset + nbytes}, outside the {buffer_size}-byte buffer")
    if kind == "tensor":
        global_shape, chunk_offsets = shape, (0,) * len(shape)
    else:
        global_shape, chunk_offsets = _dtensor_chunk(fqn, entry.get("dtensor"), shape)
    return PlannedTensor(
        fqn=fqn,
        path=path,
        dtype=dtype_name,
        global_shape=global_shape,
        chunk_offsets=chunk_offsets,
        chunk_sizes=shape,
        buffer_offset=offset,
        nbytes=nbytes,
        sharded=kind == "dtensor",
    )


def _dtensor_chunk(fqn: str, info: Any, local_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(info, dict) or "global_shape" not in info or "global_offset" not in info:
        raise InvalidRequest(f"DTensor {fqn!r} has no global_shape/global_offset in its tensor entry")
    if any(str(p).startswith("Partial") for p in info.get("placements", ())):
        raise InvalidRequest(f"DTensor {fqn!r} has a Partial placement; DCP cannot store unreduced values")
    global_shape = tuple(int(d) for d in info["global_shape"])
    offsets = tuple(int(d) for d in info["global_offset"])
    if not len(global_shape) == len(offsets) == len(local_shape):
        raise InvalidRequest(f"DTensor {fqn!r}: global shape, offset and local shape have different ranks")
    return global_shape, offsets


def _check_rebuildable(node: dict[str, Any], fqn: str, table: list[dict[str, Any]], buffer_size: int) -> None:
    """Checks a non-tensor leaf's nodes, and the buffer ranges of the tensors and arrays inside it."""
    kind, body = _kind(node, fqn)
    if kind == "dtensor":
        raise InvalidRequest(f"leaf {fqn!r} holds a DTensor inside a tuple; DCP would pickle the whole DTensor")
    if kind in ("tensor", "ndarray"):
        _planned_tensor(fqn, (), "tensor", _entry(table, body, fqn), buffer_size)
    children = [child for _key, child in body] if kind == "dict" else body if kind in ("list", "tuple") else []
    for child in children:
        _check_rebuildable(child, fqn, table, buffer_size)
