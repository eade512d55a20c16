"""GPU check of the CUDA snapshot path: pinned slot memory, side stream, optimizer pre-hook.

    python bench/gpu_check.py [--size 1GiB] [--repeats 5] [--json]

On one GPU it snapshots a CUDA state through a real agent, checks that the optimizer
pre-hook orders the next parameter update after the copy, restores into zeroed CUDA
tensors bit-exactly, and prints the stall per GiB beside a bare device-to-host copy into
pinned memory (the floor). Exits 2, saying why, where there is no CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from memckpt.local import AgentProcess
from memckpt.sizes import format_size, parse_size
from memckpt.trainer import Checkpointer


def cuda_state(size_bytes: int, n_tensors: int = 8) -> dict[str, Any]:
    numel = size_bytes // 4 // n_tensors
    generator = torch.Generator(device="cuda").manual_seed(0)
    tensors = {f"layer{i}": torch.randn(numel, device="cuda", generator=generator) for i in range(n_tensors)}
    return {"model": tensors, "step": 0, "rng": torch.get_rng_state()}


def bare_pinned_copy_s(state: dict[str, Any], repeats: int) -> float:
    """The floor: device-to-host copies into pinned, already-touched host memory."""
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).fill_(0) for k, v in state["model"].items()}
    samples = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for key, value in state["model"].items():
            pinned[key].copy_(value, non_blocking=True)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def memckpt_stall_s(ck: Checkpointer, state: dict[str, Any], repeats: int) -> tuple[float, float]:
    """First and median stall: snapshot() + the pre-hook fence + the GPU finishing the copy."""
    samples = []
    for step in range(1, repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ck.snapshot(step, state)
        ck.fence()  # what optimizer.step()'s pre-hook does
        torch.cuda.synchronize()  # no compute to hide behind: the worst case
        samples.append(time.perf_counter() - start)
        handle = ck.wait()
        assert handle is not None and handle.committed, f"snapshot {step} failed: {handle and handle.error}"
    return samples[0], statistics.median(samples[1:])


def check_prehook_orders_update(ck: Checkpointer, state: dict[str, Any]) -> bool:
    """A parameter updated right after snapshot() must reach the slot with its old value."""
    param = torch.nn.Parameter(state["model"]["layer0"])
    optimizer = torch.optim.SGD([param], lr=1.0)
    ck.attach_optimizer(optimizer)
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    ck.snapshot(10_000, {"model": {"layer0": param.detach()}, "step": 10_000})
    optimizer.step()  # the pre-hook makes this wait for the copy on the GPU
    ck.wait()
    restored = {"model": {"layer0": torch.zeros_like(before)}}
    return ck.restore(restored, coordinate=False) == 10_000 and torch.equal(restored["model"]["layer0"], before)


def run(size_bytes: int, repeats: int) -> dict[str, Any]:
    state = cuda_state(size_bytes)
    nbytes = sum(t.nbytes for t in state["model"].values())
    with tempfile.TemporaryDirectory(prefix="memckpt-gpu-") as tmp:
        agent = AgentProcess(
            socket_path=Path(tmp) / "agent.sock",
            shm_prefix=f"memckpt-gpu-{uuid.uuid4().hex[:8]}.",
            memory_limit=str(4 * nbytes + (1 << 30)),
            log_path=Path(tmp) / "agent.log",
            extra_args=["--on-exit", "remove"],
        )
        try:
            agent.start()
            job = f"gpu-{uuid.uuid4().hex[:8]}"
            with Checkpointer(job, rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
                first_s, median_s = memckpt_stall_s(ck, state, repeats)
                restored = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
                restore_start = time.perf_counter()
                step = ck.restore(restored, coordinate=False)
                torch.cuda.synchronize()
                restore_s = time.perf_counter() - restore_start
                exact = step == repeats + 1 and all(torch.equal(restored["model"][k], v) for k, v in state["model"].items())
                pinned = all(slot._pinned for slot in ck._slots.values())
                prehook_ok = check_prehook_orders_update(ck, state)
        finally:
            agent.stop()
    floor_s = bare_pinned_copy_s(state, repeats)
    gib = nbytes / (1 << 30)
    return {
        "device": torch.cuda.get_device_name(),
        "size_bytes": nbytes,
        "slots_pinned": pinned,
        "restore_bit_exact": exact,
        "prehook_orders_update": prehook_ok,
        "memckpt_first_stall_s": first_s,
        "memckpt_stall_s_per_gib": median_s / gib,
        "pinned_copy_s_per_gib": floor_s / gib,
        "stall_vs_floor": median_s / floor_s,
        "restore_s_per_gib": restore_s / gib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="state size on the GPU (default: 1GiB)")
    parser.add_argument("--repeats", type=int, default=5, help="snapshots after the first (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it where a GPU is lent", file=sys.stderr)
        return 2
    result = run(parse_size(args.size), args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['device']}, state {format_size(result['size_bytes'])} on the GPU")
        for key in ("slots_pinned", "restore_bit_exact", "prehook_orders_update"):
            print(f"  {key:28s} {result[key]}")
        print(f"  {'memckpt stall per GiB':28s} {result['memckpt_stall_s_per_gib'] * 1e3:8.1f} ms")
        print(f"  {'bare D2H pinned copy per GiB':28s} {result['pinned_copy_s_per_gib'] * 1e3:8.1f} ms")
        print(f"  {'stall / floor':28s} {result['stall_vs_floor']:8.2f}")
    ok = result["restore_bit_exact"] and result["prehook_orders_update"] and result["slots_pinned"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
