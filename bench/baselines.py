"""Baselines that memckpt's snapshot is compared against: the copy floor, torch.save/load and DCP.

Every measurement removes its files, stagers, threads and processes before it returns. A Timing
keeps the first call apart (it pays allocation and page faults) from the median of the repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import multiprocessing.resource_sharer
import os
import re
import shutil
import socket
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import _async_process_executor
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
Stager: TypeAlias = DefaultStager | FileSystemWriter


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """Cost of one baseline. `samples_s` holds every call, the first one included."""

    first_s: float
    median_s: float
    samples_s: tuple[float, ...]
    config: str = ""


class StagerKind(enum.Enum):
    PER_CALL = "per_call"  # async_save builds and closes its own DefaultStager on each call
    REUSED = "reused"  # one DefaultStager across calls: its cached staging buffers stay warm
    WRITER_CACHE = "writer_cache"  # FileSystemWriter(cache_staged_state_dict=True) stages


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncSaveConfig:
    """One way to call dcp.async_save; the StagingOptions fields apply to REUSED only."""

    mode: AsyncCheckpointerType
    stager: StagerKind = StagerKind.PER_CALL
    shared_memory: bool = False
    async_staging: bool = False
    pinned_memory: bool = False
    non_blocking_copy: bool = False

    def describe(self) -> str:
        if self.stager is not StagerKind.REUSED:
            return f"{self.mode.value}, stager={self.stager.value}"
        return (
            f"{self.mode.value}, reused DefaultStager(StagingOptions(use_pinned_memory="
            f"{self.pinned_memory}, use_shared_memory={self.shared_memory}, use_async_staging="
            f"{self.async_staging}, use_non_blocking_copy={self.non_blocking_copy}))"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncSaveTrial:
    """The outcome of one AsyncSaveConfig: a Timing, or the reason it could not run."""

    config: AsyncSaveConfig
    timing: Timing | None
    error: str = ""


def _reused(mode: AsyncCheckpointerType, *, shared: bool, async_: bool, accelerator: bool = False) -> AsyncSaveConfig:
    return AsyncSaveConfig(
        mode=mode,
        stager=StagerKind.REUSED,
        shared_memory=shared,
        async_staging=async_,
        pinned_memory=accelerator,
        non_blocking_copy=accelerator,
    )


# StagingOptions() (all True) wants an accelerator for non-blocking copies, and pinned memory is
# ignored without CUDA; both are tried, so the results say what fails here instead of assuming.
_THREAD, _PROCESS = AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS
ASYNC_SAVE_CONFIGS = (
    AsyncSaveConfig(mode=_THREAD),
    AsyncSaveConfig(mode=_THREAD, stager=StagerKind.WRITER_CACHE),
    _reused(_THREAD, shared=True, async_=True, accelerator=True),
    _reused(_THREAD, shared=True, async_=True),
    _reused(_THREAD, shared=False, async_=True),
    _reused(_THREAD, shared=True, async_=False),
    _reused(_THREAD, shared=False, async_=False),
    AsyncSaveConfig(mode=_PROCESS),
    _reused(_PROCESS, shared=True, async_=True),
)


def make_state(size_bytes: int, n_tensors: int = 16, seed: int = 0) -> State:
    """A model-like flat state: `n_tensors` float32 tensors, size rounded down to fit."""
    numel = size_bytes // (4 * n_tensors)
    if numel < 1:
        raise ValueError(f"{size_bytes} bytes cannot hold {n_tensors} float32 tensors")
    generator = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.rand(numel, generator=generator) for i in range(n_tensors)}


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456; KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (try 256MiB, 1GiB, 1000000)")
    number, unit = match.groups()
    if not unit:
        return int(float(number))
    base = 1024 if unit.lower().endswith("i") else 1000
    return int(float(number) * base ** ("KMGT".index(unit[0].upper()) + 1))


def _timing(samples_s: list[float], config: str) -> Timing:
    repeats_s = samples_s[1:] or samples_s[:1]
    return Timing(first_s=samples_s[0], median_s=statistics.median(repeats_s), samples_s=tuple(samples_s), config=config)


def _run_timed(call: Callable[[int], object], repeats: int, after: Callable[[int], object] | None = None) -> list[float]:
    """Times `call(i)` for the first call and `repeats` more; `after(i)` cleans up, untimed."""
    samples_s = []
    for i in range(1 + repeats):
        start = time.perf_counter()
        call(i)
        samples_s.append(time.perf_counter() - start)
        if after is not None:
            after(i)
    return samples_s


@contextlib.contextmanager
def _scratch_dir(directory: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=directory))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; single process is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is (disabled, )?unavailable")
        yield


def measure_copy_floor(state: Mapping[str, torch.Tensor], repeats: int) -> Timing:
    """A bare copy_ into preallocated memory: no snapshot can stall less than this."""
    destination = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    for tensor in destination.values():
        tensor.fill_(0)  # fault the pages in now, so the floor measures copying only

    def copy_all(_: int) -> None:
        for name, tensor in state.items():
            destination[name].copy_(tensor)

    config = f"copy_ into touched preallocated CPU memory, torch threads={torch.get_num_threads()}"
    return _timing(_run_timed(copy_all, repeats), config)


def measure_torch_save(state: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], repeats: int) -> Timing:
    """torch.save to a path, as users call it; no fsync, which flatters the baseline."""
    with _scratch_dir(directory, "torch-save") as scratch:
        samples_s = _run_timed(
            lambda i: torch.save(dict(state), scratch / f"state-{i}.pt"),
            repeats,
            after=lambda i: (scratch / f"state-{i}.pt").unlink(),
        )
    return _timing(samples_s, "torch.save(path), no fsync (page cache)")


def measure_dcp_save(state: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], repeats: int) -> Timing:
    """The whole dcp.save call, single process, a new checkpoint directory per call."""
    with _scratch_dir(directory, "dcp-save") as scratch, _quiet_single_process():
        samples_s = _run_timed(
            lambda i: dcp_save(dict(state), checkpoint_id=scratch / f"c{i}"),
            repeats,
            after=lambda i: shutil.rmtree(scratch / f"c{i}"),
        )
    return _timing(samples_s, "dcp.save, no process group, FileSystemWriter defaults (sync_files=True: fsync, thread_count=1)")


def _async_stall_s(state: State, checkpoint_dir: Path, config: AsyncSaveConfig, stager: Stager | None) -> float:
    """Return time plus staging: after it the caller may change the parameters. The write that
    follows is awaited and removed, untimed, so that it never overlaps the next call."""
    # a FileSystemWriter passed as the writer is also the (blocking) stager
    writer = stager if isinstance(stager, FileSystemWriter) else None
    async_stager = stager if isinstance(stager, DefaultStager) else None
    start = time.perf_counter()
    response = dcp_async_save(
        state, checkpoint_id=checkpoint_dir, storage_writer=writer, async_stager=async_stager, async_checkpointer_type=config.mode
    )
    if isinstance(response, AsyncSaveResponse):  # only async staging returns this
        response.staging_completion.result()
        stall_s = time.perf_counter() - start
        response.upload_completion.result()
    else:  # staging finished inside async_save
        stall_s = time.perf_counter() - start
        response.result()
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stall_s


def _make_stager(config: AsyncSaveConfig, directory: Path) -> Stager | None:
    if config.stager is StagerKind.WRITER_CACHE:
        return FileSystemWriter(directory, cache_staged_state_dict=True)
    if config.stager is StagerKind.REUSED:
        return DefaultStager(
            StagingOptions(
                use_pinned_memory=config.pinned_memory,
                use_shared_memory=config.shared_memory,
                use_async_staging=config.async_staging,
                use_non_blocking_copy=config.non_blocking_copy,
            )
        )
    return None


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _process_mode_context(config: AsyncSaveConfig) -> Iterator[None]:
    """Process mode needs a process group (it broadcasts the daemon's port) and leaves a daemon
    process behind in a module global; set up a 1-rank gloo group and stop the daemon after."""
    owns_group = config.mode is _PROCESS and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_loopback_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        daemon = _async_process_executor._CHECKPOINT_PROCESS
        if daemon is not None:
            _async_process_executor._CHECKPOINT_PROCESS = None
            daemon.__del__()  # sends TERMINATE, joins, and terminates it if it lingers
            # shared-memory fds reach the daemon through multiprocessing's resource sharer,
            # whose server thread would outlive it; it restarts by itself when next needed
            multiprocessing.resource_sharer.stop(timeout=5.0)
        if owns_group:
            dist.destroy_process_group()


def _measure_async_config(state: State, scratch: Path, repeats: int, config: AsyncSaveConfig) -> AsyncSaveTrial:
    try:
        with _process_mode_context(config):
            stager = _make_stager(config, scratch / "writer")
            try:
                samples_s = [_async_stall_s(state, scratch / f"c{i}", config, stager) for i in range(1 + repeats)]
            finally:
                if stager is not None:
                    stager.close()
    except Exception as error:  # a config this torch cannot run is a result, not a crash
        log.info("dcp async_save config=%s failed: %r", config.describe(), error)
        return AsyncSaveTrial(config=config, timing=None, error=f"{type(error).__name__}: {error}")
    return AsyncSaveTrial(config=config, timing=_timing(samples_s, config.describe()))


def _join_new_threads(before: set[threading.Thread], timeout_s: float) -> None:
    """Executors shut down with wait=False; give their workers time to exit, and say if not."""
    deadline = time.monotonic() + timeout_s
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    if left := [t.name for t in set(threading.enumerate()) - before]:
        log.warning("threads left after dcp async_save: %s", left)


def measure_dcp_async_configs(
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    repeats: int,
    configs: tuple[AsyncSaveConfig, ...] = ASYNC_SAVE_CONFIGS,
) -> tuple[AsyncSaveTrial, ...]:
    """Every async_save configuration's stall, or why it could not run here."""
    before = set(threading.enumerate())
    with _scratch_dir(directory, "dcp-async") as scratch, _quiet_single_process():
        trials = tuple(_measure_async_config(dict(state), scratch, repeats, c) for c in configs)
    _join_new_threads(before, timeout_s=10.0)
    return trials


def measure_dcp_async_save(state: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], repeats: int) -> Timing:
    """The stall of dcp.async_save in its fastest configuration (lowest median) on this machine."""
    return best_async_timing(measure_dcp_async_configs(state, directory, repeats))


def best_async_timing(trials: tuple[AsyncSaveTrial, ...]) -> Timing:
    """The lowest median stall among the trials that ran."""
    timings = [trial.timing for trial in trials if trial.timing is not None]
    if not timings:
        raise RuntimeError("no dcp.async_save configuration ran: " + "; ".join(trial.error for trial in trials))
    return min(timings, key=lambda timing: timing.median_s)


def measure_torch_load(
    path_or_state: str | os.PathLike[str] | Mapping[str, torch.Tensor], directory: str | os.PathLike[str], repeats: int
) -> Timing:
    """torch.load(weights_only=True) of a torch.save file; a state is saved once, untimed. The
    file was just written, so it is read from the page cache, not from the disk."""
    with _scratch_dir(directory, "torch-load") as scratch:
        if isinstance(path_or_state, Mapping):
            path = scratch / "state.pt"
            torch.save(dict(path_or_state), path)
        else:
            path = Path(path_or_state)
        samples_s = _run_timed(lambda _: torch.load(path, weights_only=True), repeats)
    return _timing(samples_s, "torch.load(path, weights_only=True), file in page cache")


def measure_dcp_load(state: Mapping[str, torch.Tensor], directory: str | os.PathLike[str], repeats: int) -> Timing:
    """dcp.load in place into a preallocated, touched state of the same shapes."""
    destination = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    with _scratch_dir(directory, "dcp-load") as scratch, _quiet_single_process():
        dcp_save(dict(state), checkpoint_id=scratch / "c")
        samples_s = _run_timed(lambda _: dcp_load(destination, checkpoint_id=scratch / "c"), repeats)
    if any(not torch.equal(destination[name], tensor) for name, tensor in state.items()):
        raise RuntimeError("dcp.load gave back different bytes")
    return _timing(samples_s, "dcp.load into preallocated touched tensors, file in page cache")


def _print_timing(name: str, timing: Timing) -> None:
    print(f"{name:<22} first_s={timing.first_s:8.3f} median_s={timing.median_s:8.3f}  config={timing.config}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--directory", default=tempfile.gettempdir(), help="on local disk")
    parser.add_argument("--all-async", action="store_true", help="print every async config")
    args = parser.parse_args(argv)
    state = make_state(args.size)
    print(f"size_bytes={sum(t.nbytes for t in state.values())} repeats={args.repeats} directory={args.directory}", flush=True)
    _print_timing("copy_floor", measure_copy_floor(state, args.repeats))
    _print_timing("torch_save", measure_torch_save(state, args.directory, args.repeats))
    _print_timing("dcp_save", measure_dcp_save(state, args.directory, args.repeats))
    trials = measure_dcp_async_configs(state, args.directory, args.repeats)
    for trial in trials if args.all_async else ():
        if trial.timing is None:
            print(f"  dcp_async[skipped]     {trial.config.describe()}: {trial.error}")
        else:
            _print_timing("  dcp_async[trial]", trial.timing)
    _print_timing("dcp_async_save", best_async_timing(trials))
    _print_timing("torch_load", measure_torch_load(state, args.directory, args.repeats))
    _print_timing("dcp_load", measure_dcp_load(state, args.directory, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
