"""Snapshots of a real FSDP2 job written by memckpt's DCP writer load with stock `dcp.load`, also resharded.

4 torchrun ranks (gloo, tiny preset) train a few steps, snapshot their state into a buffer as
the Checkpointer lays it out (`flatten` + `compute_layout`), and write it with `write_rank`;
rank 0 finalizes. The same 4 ranks, then new torchrun jobs of 2 and 3 ranks load it with stock
`dcp.load(state, storage_reader=FileSystemReader(dir))` into the trainer's own state: 4 -> 4
is bit-exact against each rank's snapshot, except per-rank values DCP keeps once (the unseeded
numpy/Python RNG states: every rank gets rank 0's); memckpt's own `read_rank_snapshot` gives
back every rank's snapshot whole. 4 -> 2 and 4 -> 3 give the same full tensors.
This module is also the torchrun worker (`python -m tests.integration.test_dcp_format`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from memckpt.agent.dcp_verify import verify
from memckpt.local import stop_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
JOB_TIMEOUT_S = 120


def _torchrun(nproc: int, *args: str, log_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tests.integration.test_dcp_format",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = process.wait(JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_process(process, grace_s=2.0)
    assert code == 0, f"torchrun {nproc} x {args} exited with {code}:\n{log_path.read_text()[-4000:]}"


def test_snapshot_written_by_memckpt_loads_with_stock_dcp_into_4_2_and_3_ranks(tmp_path: Path) -> None:
    checkpoint, work = tmp_path / "step-000000000003", tmp_path / "work"
    work.mkdir()
    # the 4 ranks that write the checkpoint then load it back (4 -> 4) in the same job, with stock
    # dcp.load into a model built anew: a torchrun job fewer
    _torchrun(4, "save", str(checkpoint), str(work), log_path=tmp_path / "save.log")
    assert (checkpoint / ".metadata").is_file()
    # keys DCP stores once though their values are per rank: only the RNGs the trainer does not seed per rank
    assert all(key.startswith("rng.") for key in json.loads((work / "divergent.json").read_text()))
    report = verify(checkpoint)
    assert report.is_ok and report.checked_bytes > 0, report.problems
    for world in (4, 2, 3):
        if world != 4:
            _torchrun(world, "load", str(checkpoint), str(work), log_path=tmp_path / f"load{world}.log")
        verdicts = [json.loads((work / f"verdict-{world}-{r}.json").read_text()) for r in range(world)]
        for verdict in verdicts:
            assert verdict["mismatches"] == [], f"loaded into {world} ranks: {verdict}"
            assert verdict["compared_tensors"] > 10
        if world == 4:
            assert [v["snapshot_differences"] for v in verdicts] == [[]] * 4, "4 -> 4 must give back each rank's exact snapshot"
            assert all(v["memckpt_read_exact"] for v in verdicts)


# ---- the torchrun worker ------------------------------------------------------------------


def _build(seed: int = 0) -> tuple[Any, Any]:
    from memckpt.trainer.model import GPT, PRESETS
    from memckpt.trainer.train import shard

    torch.manual_seed(seed)
    model = GPT(PRESETS["tiny"])
    shard(model, torch.distributed.get_world_size(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, optimizer


def _snapshot(state: dict[str, Any]) -> tuple[bytearray, bytes]:
    """The slot bytes and metadata the Checkpointer would commit for `state`."""
    from memckpt.trainer.layout import compute_layout
    from memckpt.trainer.tree import encode_meta, flatten

    flat = flatten(state)
    layout = compute_layout(flat.specs)
    buffer = bytearray(layout.size_bytes)
    slot = torch.frombuffer(buffer, dtype=torch.uint8)
    for tensor, place in zip(flat.tensors, layout.placements):
        if place.nbytes:
            slot[place.offset : place.offset + place.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return buffer, encode_meta(flat, [p.offset for p in layout.placements], layout.size_bytes)


def _full_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of model and optimizer state, unsharded (a collective: every rank calls it)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.tensor import DTensor

    flat, _ = flatten_state_dict({"model": state["model"], "optim": state["optim"]})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}


def _save(checkpoint: Path, work: Path) -> None:
    from memckpt.agent.dcp import finalize, read_rank_results, write_rank
    from memckpt.trainer.data import batch_for_step, make_corpus
    from memckpt.trainer.state import training_state

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, optimizer = _build()
    corpus = make_corpus(0)
    for step in range(1, STEPS + 1):
        tokens, targets = batch_for_step(corpus, seed=0, step=step, rank=rank, batch_size=2, seq_len=model.config.seq_len)
        model(tokens, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = training_state(model, optimizer, step=STEPS, data_position=STEPS + 1)
    buffer, meta = _snapshot(state)
    (work / f"snapshot-{rank}.bin").write_bytes(buffer)
    (work / f"snapshot-{rank}.json").write_bytes(meta)
    write_rank(checkpoint, rank, memoryview(buffer), meta)
    full = _full_tensors(state)
    torch.distributed.barrier()
    if rank == 0:
        torch.save(full, work / "full.pt")
        merged = finalize(checkpoint, read_rank_results(checkpoint, world), world_size=world)
        (work / "divergent.json").write_text(json.dumps(merged.divergent))
    torch.distributed.barrier()


def _load(checkpoint: Path, work: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from memckpt.agent.dcp_restore import read_rank_snapshot
    from memckpt.trainer.state import training_state

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model, optimizer = _build(seed=1)  # other initial values: everything must come from the checkpoint
    state = training_state(model, optimizer, step=0, data_position=0)
    dcp.load(state, storage_reader=FileSystemReader(checkpoint))
    mismatches = []
    if state["step"] != STEPS or state["data"] != STEPS + 1:
        mismatches.append(f"step/data {state['step']}/{state['data']}")
    want = torch.load(work / "full.pt", weights_only=True)
    got = _full_tensors(state)
    if set(got) != set(want):
        mismatches.append(f"keys differ: {sorted(set(got) ^ set(want))}")
    for key in sorted(set(got) & set(want)):
        if got[key].dtype != want[key].dtype or not torch.equal(got[key], want[key]):
            mismatches.append(key)
    verdict: dict[str, Any] = {"mismatches": mismatches, "compared_tensors": len(want)}
    if world == 4:  # each rank's own snapshot, except keys DCP keeps once that differed: rank 0's copy
        got = _leaf_bytes(*_snapshot(state))
        mine = _leaf_bytes((work / f"snapshot-{rank}.bin").read_bytes(), (work / f"snapshot-{rank}.json").read_bytes())
        first = _leaf_bytes((work / "snapshot-0.bin").read_bytes(), (work / "snapshot-0.json").read_bytes())
        divergent = set(json.loads((work / "divergent.json").read_text()))
        want_leaves = {k: first[k] if k in divergent else v for k, v in mine.items()}
        verdict["snapshot_differences"] = sorted(k for k in set(got) | set(want_leaves) if got.get(k) != want_leaves.get(k))
        # memckpt's own reader gives back the rank's snapshot whole, per-rank values included
        snapshot = (work / f"snapshot-{rank}.bin").read_bytes()
        restored = bytearray(len(snapshot))
        meta = read_rank_snapshot(checkpoint, rank, memoryview(restored))
        verdict["memckpt_read_exact"] = restored == snapshot and meta == (work / f"snapshot-{rank}.json").read_bytes()
    (work / f"verdict-{world}-{rank}.json").write_text(json.dumps(verdict))


def _leaf_bytes(buffer: bytes | bytearray, meta: bytes) -> dict[str, bytes]:
    """Each DCP key of a snapshot, and the bytes of its value (tensor bytes, or torch.save of the value)."""
    import io

    from memckpt.agent.dcp_plan import PlannedTensor, plan_items, rebuild_object

    raw = json.loads(meta)
    leaves = {}
    for item in plan_items(raw, len(buffer)):
        if isinstance(item, PlannedTensor):
            leaves[item.fqn] = bytes(buffer[item.buffer_offset : item.buffer_offset + item.nbytes])
        else:
            out = io.BytesIO()
            torch.save(rebuild_object(item.node, raw["tensors"], memoryview(buffer)), out)
            leaves[item.fqn] = out.getvalue()
    return leaves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load"])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        if args.mode == "save":
            _save(args.checkpoint, args.work)
        _load(args.checkpoint, args.work)
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
