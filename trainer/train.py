"""The bundled trainer: a small GPT, sharded with FSDP2, snapshotting into memckpt every N steps.

Run it under torchrun: `torchrun --nproc-per-node 2 -m memckpt.trainer --job demo --steps 50`.
With one seed, a run killed and resumed logs the same losses, bit for bit, as a run never
stopped: the batch of a step depends only on (seed, step, rank), and everything else that
changes is in the snapshot (parameters, optimizer state, RNG states, step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from memckpt.agent.config import SOCKET_ENV, default_socket
from memckpt.trainer.checkpointer import Checkpointer
from memckpt.trainer.data import batch_for_step, make_corpus
from memckpt.trainer.model import GPT, PRESETS, count_parameters
from memckpt.trainer.state import apply_training_state, refresh_training_state, training_state

log = logging.getLogger("memckpt.trainer")

FINAL_SNAPSHOT_WAIT_S = 60.0  # how long the last step's snapshot may wait for a slot (see Checkpointer.snapshot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m memckpt.trainer",
        description="The bundled example trainer (run it under torchrun). Prints one line per step "
        "(step, loss, snapshot stall) and a summary; resumes from memckpt's memory after a restart.",
    )
    parser.add_argument("--job", required=True, help="job name, shared by all ranks ([A-Za-z0-9._-]{1,64})")
    parser.add_argument("--steps", type=int, default=100, help="train until this step (default: 100)")
    parser.add_argument("--snapshot-every", type=int, default=1, help="snapshot every N steps; 0 turns memckpt off (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data and every RNG (default: 0)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="model size: tiny (tests), small (demo), default (~25 M parameters)",
    )
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--width", type=int, help="override the preset's model width")
    parser.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step (default: 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument(
        "--socket",
        type=Path,
        help=f"the node agent's socket; {{rank}}, {{local_rank}} are filled in (default: ${SOCKET_ENV}, else {default_socket()})",
    )
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / local ranks)")
    parser.add_argument("--events", type=Path, help="append one JSON line per event (start, restore, step, end) to this file")
    parser.add_argument("--step-delay-s", type=float, default=0.0, help="sleep after each step (to watch a demo)")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start from this torch.distributed.checkpoint directory (e.g. a persisted memckpt checkpoint), loaded "
        "with stock dcp.load and resharded to this world size, instead of restoring through memckpt",
    )
    return parser


@dataclass(slots=True)
class EventLog:
    """JSON lines for tools (the demo, tests); one write() per line so ranks never interleave."""

    path: Path | None
    rank: int
    attempt: int

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"event": event, "rank": self.rank, "attempt": self.attempt, "pid": os.getpid(), "t": time.time(), **fields}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)


def build_model(args: argparse.Namespace) -> GPT:
    preset = PRESETS[args.preset]
    config = type(preset)(
        n_layer=args.layers or preset.n_layer,
        n_head=preset.n_head,
        d_model=args.width or preset.d_model,
        seq_len=args.seq_len or preset.seq_len,
    )
    # every rank builds the same initial model before sharding, and starts every RNG alike:
    # torch.distributed.checkpoint stores values that are not sharded tensors once, as if
    # replicated, so per-rank RNG states would not survive a persisted checkpoint
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return GPT(config)


def shard(model: GPT, world_size: int, device: torch.device) -> None:
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def mean_loss(loss: torch.Tensor) -> float:
    value = loss.detach().clone()
    dist.all_reduce(value)
    return float(value.item()) / dist.get_world_size()


def init_distributed(backend: str) -> None:
    """init_process_group, with the store keys of each torchrun restart kept apart.

    Under torchrun's agent store the keys of a restarted worker group land in the same
    store as the group before it, so a restarted rank can read a dead peer's gloo address
    and fail to connect. A prefix per restart attempt keeps every attempt to itself.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timedelta(minutes=5)
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"memckpt/attempt_{attempt}", base)  # type: ignore[attr-defined]
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def use_deterministic_cuda() -> None:
    """On a GPU too, one seed gives the same losses bit for bit, so that a resumed run can be
    compared with one never stopped: deterministic kernels only (cuBLAS needs a fixed workspace,
    set before its first use), and the plain attention (the fused attention kernels' backward
    passes add up in an order that changes from run to run)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    # filling every new tensor would cost each allocation, and nothing here reads memory unwritten
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def run(args: argparse.Namespace) -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_distributed(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_deterministic_cuda()
    events = EventLog(args.events, rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    events.write("start", world_size=world, device=str(device))

    model = build_model(args).to(device)
    shard(model, world, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    corpus = make_corpus(args.seed)
    state = training_state(model, optimizer, step=0, data_position=1)
    ck = Checkpointer(args.job, socket_path=args.socket) if args.snapshot_every > 0 else None
    first_step = 1
    if ck is not None:
        ck.attach_optimizer(optimizer)
        if ck.metrics_address:
            events.write("metrics", address=ck.metrics_address)
    if args.init_from is not None:
        started = time.perf_counter()
        dcp_load(state, storage_reader=FileSystemReader(str(args.init_from)))
        apply_training_state(model, optimizer, state)
        first_step = int(state["data"])
        state = training_state(model, optimizer, step=first_step - 1, data_position=first_step)
        events.write("restore", step=first_step - 1, restore_s=time.perf_counter() - started, source="init-from")
    elif ck is not None:
        started = time.perf_counter()
        restored = ck.restore(state)
        if restored is not None:
            apply_training_state(model, optimizer, state)
            first_step = int(state["data"])
            state = training_state(model, optimizer, step=restored, data_position=first_step)
            events.write("restore", step=restored, restore_s=time.perf_counter() - started, source=ck.restored_from)
    if rank == 0:
        log.info("job=%s world=%d parameters=%d first_step=%d", args.job, world, count_parameters(model), first_step)
        if first_step > 1:
            log.info("resumed at step %d", first_step - 1)
    dist.barrier()

    started = time.perf_counter()
    stalls_ms: list[float] = []
    for step in range(first_step, args.steps + 1):
        tokens, targets = batch_for_step(
            corpus, seed=args.seed, step=step, rank=rank, batch_size=args.batch_size, seq_len=model.config.seq_len
        )
        loss = model(tokens.to(device), targets.to(device))
        loss.backward()
        stalled_before = ck.stats.total_stall_s if ck is not None else 0.0
        optimizer.step()  # the pre-hook waits for the previous snapshot's copy
        optimizer.zero_grad(set_to_none=True)
        if ck is not None and step % args.snapshot_every == 0:
            refresh_training_state(state, step=step, data_position=step + 1)
            # the last step waits for a slot rather than be skipped: a finished run keeps its end
            ck.snapshot(step, state, wait_s=FINAL_SNAPSHOT_WAIT_S if step == args.steps else 0.0)
        # after the snapshot call: on a GPU it runs while the optimizer step and the loss's
        # all-reduce still run there, not after waiting for them
        value = mean_loss(loss)
        # what this step waited for checkpointing: the fence in optimizer.step plus snapshot()
        stall_ms = ((ck.stats.total_stall_s if ck is not None else 0.0) - stalled_before) * 1e3
        stalls_ms.append(stall_ms)
        events.write("step", step=step, loss=value, loss_hex=float.hex(value), stall_ms=stall_ms)
        if rank == 0:
            log.info("step=%d loss=%.6f stall_ms=%.2f", step, value, stall_ms)
        if args.step_delay_s:
            time.sleep(args.step_delay_s)
    elapsed = time.perf_counter() - started
    steps_done = args.steps - first_step + 1
    if ck is not None:
        ck.wait()
        failures = dict(ck.stats.failures)
        ck.close()
    else:
        failures = {}
    summary = {
        "steps": steps_done,
        "elapsed_s": elapsed,
        "steps_per_s": steps_done / elapsed if elapsed else 0.0,
        "mean_stall_ms": sum(stalls_ms) / len(stalls_ms) if stalls_ms else 0.0,
        "snapshot_failures": failures,
    }
    events.write("end", **summary)
    if rank == 0:
        log.info("summary %s", json.dumps(summary))
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    return run(args)


def exit_now(code: int) -> None:
    """Ends the worker without running interpreter teardown.

    torch 2.13 with FSDP2 and gloo sometimes aborts in C++ static destructors at exit
    ("terminate called without an active exception"), after all work is done; torchrun
    would report that as a failed worker. Everything is flushed and closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
