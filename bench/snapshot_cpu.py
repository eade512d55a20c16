"""What one `Checkpointer.snapshot()` call costs the training thread, for the bundled trainer's
state (a GPT sharded with FSDP2 and its AdamW state: hundreds of DTensor leaves).

A snapshot every step is almost free only if the call itself is: the copy runs in the
background, but walking the state, asking the agent for a slot and starting the copies happen on
the training thread, before the next step. One process, a world of one (gloo on the CPU; NCCL
with the state on the GPU where there is one), a real agent. Each figure is a median over
`--repeats` calls, with the previous snapshot committed and the agent idle before each:

- `step_ms`: one training step (forward, backward, optimizer step), the time to compare with;
- `snapshot_call_ms`: `snapshot()` itself, as the trainer calls it after `optimizer.step()`;
- `flatten_ms`: the walk of the state alone (part of the call);
- `bare_copy_launch_ms` (GPU only): a loop of `copy_(non_blocking=True)` of every leaf into
  pinned host memory: the floor of starting the copies one by one.

    python bench/snapshot_cpu.py [--preset default] [--repeats 20] [--profile] [--json]

`--profile` prints the calls' cProfile, by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapshot_stall import running_agent  # noqa: E402

from memckpt.trainer.checkpointer import Checkpointer  # noqa: E402
from memckpt.trainer.data import batch_for_step, make_corpus  # noqa: E402
from memckpt.trainer.state import refresh_training_state, training_state  # noqa: E402
from memckpt.trainer.train import build_model, build_parser, shard  # noqa: E402
from memckpt.trainer.tree import flatten  # noqa: E402


def timed(fn: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(preset: str, repeats: int, profile: bool) -> dict[str, Any]:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="memckpt-bench-") as tmp:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1
        )
        try:
            return _measure(Path(tmp), device, preset, repeats, profile)
        finally:
            dist.destroy_process_group()


def _measure(workdir: Path, device: torch.device, preset: str, repeats: int, profile: bool) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args = build_parser().parse_args(["--job", "bench", "--preset", preset])
    model = build_model(args).to(device)
    shard(model, 1, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    corpus = make_corpus(0)
    steps = iter(range(1, 1 << 30))

    def train_step() -> None:
        tokens, targets = batch_for_step(corpus, seed=0, step=next(steps), rank=0, batch_size=8, seq_len=model.config.seq_len)
        model(tokens.to(device), targets.to(device)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    state = training_state(model, optimizer, step=0, data_position=1)
    flat = flatten(state)
    leaves, nbytes = len(flat.tensors), sum(t.nbytes for t in flat.tensors)
    for _ in range(3):
        train_step()
    step_ms = timed(train_step, max(3, repeats // 4))
    flatten_ms = timed(lambda: flatten(state), repeats)
    bare_ms: float | None = None
    if device.type == "cuda":
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in flat.tensors]

        def launch() -> None:
            for dst, src in zip(pinned, flat.tensors):
                dst.copy_(src, non_blocking=True)

        launch()  # the first launches allocate and warm up: not counted
        sync(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            launch()
            samples.append(time.perf_counter() - start)
            sync(device)
        bare_ms = statistics.median(samples) * 1e3
    with running_agent(workdir, memory_limit_bytes=3 * nbytes + (1 << 30)) as agent:
        with Checkpointer("bench", rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
            ck.attach_optimizer(optimizer)
            profiler = cProfile.Profile()
            samples = []
            calls = repeats + 3  # the first three (registration, first mappings) are not counted
            for step in range(1, calls + (repeats if profile else 0) + 1):
                refresh_training_state(state, step=step, data_position=step + 1)
                profiled = step > calls  # a second round of calls, under the profiler, not timed
                start = time.perf_counter()
                if profiled:
                    profiler.enable()
                ck.snapshot(step, state)
                profiler.disable()
                if not profiled:
                    samples.append(time.perf_counter() - start)
                handle = ck.wait()
                if handle is None or not handle.committed:
                    raise RuntimeError(f"snapshot {step} failed: {handle and handle.error!r}")
                sync(device)
                time.sleep(0.05)  # the agent checksums the commit meanwhile: leave it idle for the next call
            call_ms = statistics.median(samples[3:]) * 1e3
    if profile:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": preset,
        "leaves": leaves,
        "state_bytes": nbytes,
        "step_ms": step_ms,
        "snapshot_call_ms": call_ms,
        "flatten_ms": flatten_ms,
        "bare_copy_launch_ms": bare_ms,
        "call_vs_step": call_ms / step_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["tiny", "small", "default"], help="model size (default: default)")
    parser.add_argument("--repeats", type=int, default=20, help="calls measured (default: 20)")
    parser.add_argument("--profile", action="store_true", help="print the snapshot() calls' cProfile to stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.preset, args.repeats, args.profile)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['device']}, preset {result['preset']}: {result['leaves']} leaves, {result['state_bytes'] / 2**20:.0f} MiB")
    print(f"  {'training step':34s} {result['step_ms']:8.2f} ms")
    print(f"  {'snapshot() call':34s} {result['snapshot_call_ms']:8.2f} ms  ({100 * result['call_vs_step']:.1f} % of a step)")
    print(f"  {'  of which the state walk':34s} {result['flatten_ms']:8.2f} ms")
    if result["bare_copy_launch_ms"] is not None:
        print(f"  {'bare copy_ launches (floor)':34s} {result['bare_copy_launch_ms']:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
