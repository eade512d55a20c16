"""A torchrun worker for the persistence tests: the bundled trainer's state, restored two ways.

    python -m torch.distributed.run ... tests/integration/persist_worker.py --job J --socket S --checkpoint DIR --out OUT

Each rank builds the trainer's model and optimizer (tiny preset) as `memckpt.trainer` does,
restores the job's newest snapshot from memckpt's memory into one state, loads DIR with
stock `torch.distributed.checkpoint.load` into another, and writes, per rank, whether every
tensor and value of the two is equal (bit for bit) to OUT/rank-N.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from memckpt.trainer import Checkpointer
from memckpt.trainer.model import GPT, PRESETS
from memckpt.trainer.state import training_state
from memckpt.trainer.train import shard


def fresh_state(seed: int) -> tuple[GPT, dict[str, Any]]:
    torch.manual_seed(seed + 1000)  # other weights than the run's: a load that does nothing shows
    model = GPT(PRESETS["tiny"])
    shard(model, dist.get_world_size(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    return model, training_state(model, optimizer, step=0, data_position=1)


def leaves(obj: Any, path: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in leaves(value, f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in leaves(value, f"{path}/{i}").items()}
    if hasattr(obj, "to_local"):
        obj = obj.to_local()
    if isinstance(obj, torch.Tensor):
        return {path: obj.detach().clone()}
    return {path: obj.tolist() if hasattr(obj, "tolist") else obj}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    wrong = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                wrong.append(key)
        elif x != y:
            wrong.append(key)
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _, from_memory = fresh_state(1)
    with Checkpointer(args.job, socket_path=args.socket) as ck:
        step = ck.restore(from_memory)
    _, from_disk = fresh_state(2)
    dcp.load(from_disk, storage_reader=dcp.FileSystemReader(str(args.checkpoint)))
    report = {
        "rank": rank,
        "memory_step": step,
        "source": ck.restored_from,
        "leaves": len(leaves(from_memory)),
        "differences": differences(leaves(from_memory), leaves(from_disk)),
        "pid": os.getpid(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
