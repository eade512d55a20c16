"""How long each way to checkpoint stops training, and how long each way to restore takes.

One state size, one run: torch.save, dcp.save, dcp.async_save (best configuration), a memckpt
snapshot into a real agent, and the copy floor; then memckpt restore against torch.load and
dcp.load. A stall is the time from the checkpoint call until the parameters may change again,
with no compute to hide behind. The first call of each is reported apart (it allocates and
faults memory); the figure that counts is the median of the repeats after it. As DCP's
background write is awaited before its next call, so is the agent's background checksum of each
memckpt commit; the `back to back` row does not wait, and shows what that checksum costs a copy
that runs beside it.

    python bench/snapshot_stall.py --size 1GiB --repeats 5 [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import baselines
import grpc
import torch
from baselines import AsyncSaveConfig, StagerKind, Timing
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from memckpt.agent.shm import ShmDir
from memckpt.local import AgentProcess, wait_until
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.trainer.checkpointer import Checkpointer
from memckpt.trainer.copier import DEFAULT_COPY_THREADS

# The configuration that BASELINES.md found fastest here; --quick measures only this one.
QUICK_ASYNC_CONFIG = AsyncSaveConfig(
    mode=AsyncCheckpointerType.THREAD, stager=StagerKind.REUSED, shared_memory=True, async_staging=True
)
LOG_TAIL_BYTES = 4000


@dataclass(frozen=True, slots=True, kw_only=True)
class StallReport:
    """Every figure of one run; `*_s` are medians of the repeats after the first call."""

    size_bytes: int
    repeats: int
    copy_floor_s: float
    memckpt_stall_s: float
    memckpt_first_stall_s: float
    memckpt_stall_samples_s: tuple[float, ...]
    memckpt_back_to_back_stall_s: float  # the agent still checksums the snapshot before
    memckpt_back_to_back_samples_s: tuple[float, ...]
    torch_save_s: float
    dcp_save_s: float
    dcp_async_save_s: float
    dcp_async_first_s: float
    dcp_async_config: str
    memckpt_restore_s: float
    memckpt_first_restore_s: float
    torch_load_s: float
    dcp_load_s: float
    stall_vs_floor: float
    torch_save_over_stall: float
    dcp_save_over_stall: float
    dcp_async_over_stall: float
    torch_load_over_restore: float
    dcp_load_over_restore: float


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timing_of(samples_s: list[float], config: str) -> Timing:
    """The first sample apart, the median of the rest: the same rule as baselines' Timing."""
    repeats_s = samples_s[1:] or samples_s[:1]
    return Timing(first_s=samples_s[0], median_s=statistics.median(repeats_s), samples_s=tuple(samples_s), config=config)


def log_tail(path: Path) -> str:
    if not path.exists():
        return ""
    return path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")


SHM_PREFIX_ROOT = "memckpt-bench-"  # every agent a bench starts gets a unique prefix below this


@contextlib.contextmanager
def running_agent(
    workdir: Path, memory_limit_bytes: int, *, name: str = "agent", extra_args: Sequence[str] = ()
) -> Iterator[AgentProcess]:
    """A real agent (`name`.sock, `name`.log in `workdir`, `extra_args` added to its flags) with
    a unique shm prefix; stopped, and its shm checked to be gone, however the block ends."""
    agent = AgentProcess(
        socket_path=workdir / f"{name}.sock",
        shm_prefix=f"{SHM_PREFIX_ROOT}{uuid.uuid4().hex[:8]}.",
        memory_limit=str(memory_limit_bytes),
        log_path=workdir / f"{name}.log",
        extra_args=["--on-exit", "remove", *extra_args],
    )
    try:
        agent.start()
        progress(f"agent pid={agent.pid} socket={agent.socket_path} shm_prefix={agent.shm_prefix}")
        yield agent
    except BaseException:
        progress(f"agent log tail:\n{log_tail(agent.log_path)}")
        raise
    finally:
        returncode = agent.stop()
        if returncode not in (0, None):
            progress(f"warning: agent exited with {returncode}:\n{log_tail(agent.log_path)}")
        _remove_leftover_segments(agent.shm_prefix)


def _remove_leftover_segments(prefix: str) -> None:
    shm = ShmDir()
    if left := shm.list_names(prefix):
        progress(f"warning: agent left shm segments {left}; removing them")
        for name in left:
            shm.unlink(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemckptTimings:
    stall: Timing  # the agent's work after each commit (checksums) is awaited, untimed
    back_to_back_stall: Timing  # the next snapshot starts while the agent checksums the last
    restore: Timing


def is_checksummed(stub: pb_grpc.AgentServiceStub, job: str, step: int) -> bool:
    """Whether the agent has checksummed rank 0's committed `step`: its last work after a commit."""
    reply = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    return any(
        slot.step == step and slot.checksum_ready
        for rank in reply.ranks
        if rank.job == job and rank.rank == 0
        for slot in rank.slots
    )


def measure_memckpt_snapshot(
    ck: Checkpointer, fence: torch.optim.Optimizer, state: dict[str, torch.Tensor], steps: range, settle: Callable[[int], object]
) -> Timing:
    """snapshot() plus the wait that `fence.step()` (its optimizer pre-hook) makes for the copy.
    The commit, then `settle(step)`, are awaited after each call, untimed."""
    samples_s = []
    for step in steps:
        start = time.perf_counter()
        handle = ck.snapshot(step, state)
        fence.step()
        samples_s.append(time.perf_counter() - start)
        ck.wait()
        if not handle.committed:
            raise RuntimeError(f"memckpt snapshot of step {step} failed: {handle.error!r}")
        settle(step)
    return timing_of(samples_s, f"Checkpointer.snapshot + optimizer pre-hook fence, {DEFAULT_COPY_THREADS} copy threads")


def measure_memckpt_restore(job: str, socket_path: Path, state: Mapping[str, torch.Tensor], repeats: int) -> Timing:
    """restore() into a preallocated, touched state, each time by a new Checkpointer (as in a
    restarted process: it maps the slot and the agent verifies its checksums)."""
    destination = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    samples_s = []
    for _ in range(1 + repeats):
        with Checkpointer(job, rank=0, world_size=1, socket_path=socket_path, strict=True) as reader:
            start = time.perf_counter()
            step = reader.restore(destination, coordinate=False)
            samples_s.append(time.perf_counter() - start)
        if step is None:
            raise RuntimeError(f"memckpt restore of job {job} found no committed snapshot")
    if any(not torch.equal(destination[name], tensor) for name, tensor in state.items()):
        raise RuntimeError("memckpt restore gave back different bytes")
    return timing_of(samples_s, "Checkpointer.restore by a new Checkpointer, into preallocated touched tensors")


def measure_memckpt(state: dict[str, torch.Tensor], repeats: int) -> MemckptTimings:
    """Snapshot stalls and restores against a real agent that lives for this call only. The
    first snapshot registers the rank: the agent allocates and pre-faults its slots then."""
    size_bytes = sum(t.nbytes for t in state.values())
    # attach_optimizer's pre-hook is the fence training goes through; an SGD step over a
    # parameter without a gradient does nothing else
    fence = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    workdir = Path(tempfile.mkdtemp(prefix="memckpt-bench-"))
    try:
        with (
            running_agent(workdir, memory_limit_bytes=3 * size_bytes + (1 << 30)) as agent,
            grpc.insecure_channel(f"unix:{agent.socket_path}") as channel,
        ):
            stub = pb_grpc.AgentServiceStub(channel)
            job = f"bench-{uuid.uuid4().hex[:8]}"  # segment names (prefix.job.rN.sN.vN) must fit 64 chars
            with Checkpointer(job, rank=0, world_size=1, socket_path=agent.socket_path, strict=True) as ck:
                ck.attach_optimizer(fence)

                def settle(step: int) -> None:
                    wait_until(lambda: is_checksummed(stub, job, step), 60.0, f"agent checksum of step {step}", interval_s=0.005)

                settled = measure_memckpt_snapshot(ck, fence, state, range(1, repeats + 2), settle)
                progress(f"memckpt snapshot: first {settled.first_s:.3f}s median {settled.median_s:.3f}s")
                back_to_back = measure_memckpt_snapshot(
                    ck, fence, state, range(repeats + 2, 2 * repeats + 3), settle=lambda step: None
                )
                progress(f"memckpt snapshot back to back: median {back_to_back.median_s:.3f}s")
                settle(2 * repeats + 2)
            restore = measure_memckpt_restore(job, agent.socket_path, state, repeats)
            progress(f"memckpt restore: first {restore.first_s:.3f}s median {restore.median_s:.3f}s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return MemckptTimings(stall=settled, back_to_back_stall=back_to_back, restore=restore)


def measure_dcp_async(state: dict[str, torch.Tensor], directory: str, repeats: int, quick: bool) -> Timing:
    configs = (QUICK_ASYNC_CONFIG,) if quick else baselines.ASYNC_SAVE_CONFIGS
    trials = baselines.measure_dcp_async_configs(state, directory, repeats, configs=configs)
    for trial in trials:
        if trial.timing is None:
            progress(f"  dcp async_save could not run {trial.config.describe()}: {trial.error}")
        else:
            progress(f"  dcp async_save median {trial.timing.median_s:.3f}s: {trial.config.describe()}")
    return baselines.best_async_timing(trials)


def run(size_bytes: int, repeats: int, directory: str, quick: bool) -> StallReport:
    state = baselines.make_state(size_bytes)
    size_bytes = sum(t.nbytes for t in state.values())
    progress(f"state {size_bytes} bytes in {len(state)} tensors, {repeats} repeats after the first")
    floor = baselines.measure_copy_floor(state, repeats)
    progress(f"copy floor: median {floor.median_s:.3f}s")
    memckpt = measure_memckpt(state, repeats)
    stall, restore = memckpt.stall, memckpt.restore
    torch_save = baselines.measure_torch_save(state, directory, repeats)
    progress(f"torch.save: median {torch_save.median_s:.3f}s")
    dcp_save = baselines.measure_dcp_save(state, directory, repeats)
    progress(f"dcp.save: median {dcp_save.median_s:.3f}s")
    dcp_async = measure_dcp_async(state, directory, repeats, quick)
    torch_load = baselines.measure_torch_load(state, directory, repeats)
    progress(f"torch.load: median {torch_load.median_s:.3f}s")
    dcp_load = baselines.measure_dcp_load(state, directory, repeats)
    progress(f"dcp.load: median {dcp_load.median_s:.3f}s")
    return StallReport(
        size_bytes=size_bytes,
        repeats=repeats,
        copy_floor_s=floor.median_s,
        memckpt_stall_s=stall.median_s,
        memckpt_first_stall_s=stall.first_s,
        memckpt_stall_samples_s=stall.samples_s,
        memckpt_back_to_back_stall_s=memckpt.back_to_back_stall.median_s,
        memckpt_back_to_back_samples_s=memckpt.back_to_back_stall.samples_s,
        torch_save_s=torch_save.median_s,
        dcp_save_s=dcp_save.median_s,
        dcp_async_save_s=dcp_async.median_s,
        dcp_async_first_s=dcp_async.first_s,
        dcp_async_config=dcp_async.config,
        memckpt_restore_s=restore.median_s,
        memckpt_first_restore_s=restore.first_s,
        torch_load_s=torch_load.median_s,
        dcp_load_s=dcp_load.median_s,
        stall_vs_floor=stall.median_s / floor.median_s,
        torch_save_over_stall=torch_save.median_s / stall.median_s,
        dcp_save_over_stall=dcp_save.median_s / stall.median_s,
        dcp_async_over_stall=dcp_async.median_s / stall.median_s,
        torch_load_over_restore=torch_load.median_s / restore.median_s,
        dcp_load_over_restore=dcp_load.median_s / restore.median_s,
    )


def format_table(report: StallReport) -> str:
    """One row per method; 'vs memckpt' is its median over memckpt's (stall or restore)."""
    r = report
    stalls = [
        ("copy floor", None, r.copy_floor_s),
        ("memckpt snapshot", r.memckpt_first_stall_s, r.memckpt_stall_s),
        ("  back to back", None, r.memckpt_back_to_back_stall_s),
        ("torch.save", None, r.torch_save_s),
        ("dcp.save", None, r.dcp_save_s),
        ("dcp.async_save", r.dcp_async_first_s, r.dcp_async_save_s),
    ]
    restores = [
        ("memckpt restore", r.memckpt_first_restore_s, r.memckpt_restore_s),
        ("torch.load", None, r.torch_load_s),
        ("dcp.load", None, r.dcp_load_s),
    ]
    lines = [
        f"size {r.size_bytes} bytes ({r.size_bytes / 2**30:.2f} GiB), median of {r.repeats} repeats after the first call",
        f"{'method':<18} | {'first s':>8} | {'median s':>8} | vs memckpt",
    ]
    for title, rows, reference_s in (("stall", stalls, r.memckpt_stall_s), ("restore", restores, r.memckpt_restore_s)):
        lines.append(f"-- {title}")
        for name, first_s, median_s in rows:
            first = "" if first_s is None else f"{first_s:8.4f}"
            lines.append(f"{name:<18} | {first:>8} | {median_s:8.4f} | {median_s / reference_s:6.2f}x")
    lines.append(f"dcp.async_save config: {r.dcp_async_config}")
    lines.append(
        f"memckpt stall samples s: {', '.join(f'{s:.3f}' for s in r.memckpt_stall_samples_s)}; "
        f"back to back: {', '.join(f'{s:.3f}' for s in r.memckpt_back_to_back_samples_s)}"
    )
    lines.append(
        f"memckpt stall / copy floor: {r.stall_vs_floor:.2f}; dcp.async_save / memckpt stall: "
        f"{r.dcp_async_over_stall:.2f}; torch.load / memckpt restore: {r.torch_load_over_restore:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size",
        type=baselines.parse_size,
        default=baselines.parse_size("1GiB"),
        help="state size, e.g. 256MiB or 1GiB (default: 1GiB)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="calls after the first one (default: 5)")
    parser.add_argument(
        "--directory", default=tempfile.gettempdir(), help="where torch.save and DCP write, on local disk (default: the temp dir)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="measure only one dcp.async_save configuration: " + QUICK_ASYNC_CONFIG.describe()
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    report = run(args.size, args.repeats, args.directory, args.quick)
    if args.json:
        print(json.dumps(dataclasses.asdict(report)), flush=True)
    else:
        print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
