"""Persisting a snapshot to the filesystem: memckpt's writer against `dd`, and the restore against `dcp.load`.

One rank's snapshot (a model-like state of `--size`, laid out in one buffer as the trainer's
client lays it out) is written the way the agent's persister writes it (`agent/dcp.py`:
`write_rank` then `finalize`, fsync, no rate limit), into `--dir`. The baseline is `dd` of the
same number of bytes from /dev/zero to the same filesystem with `conv=fsync`, measured in the
same run, rounds alternating. Then the checkpoint is loaded back into a state of the same
shapes twice: through memckpt's restore path (`trainer/persisted.py` `load_persisted`, what
`Checkpointer` runs: at the same world size the rank's own items straight from its file,
crc32c-checked, then one copy into the state) and with stock `dcp.load(state,
checkpoint_id=...)`; the page cache is dropped before each load when the bench may (root).

    python bench/persist.py [--size 1GiB] [--rounds 3] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from baselines import make_state, parse_size
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from memckpt.agent import dcp
from memckpt.trainer.layout import compute_layout
from memckpt.trainer.persisted import EXACT, load_persisted
from memckpt.trainer.tree import encode_meta, flatten


def snapshot_of(state: dict[str, torch.Tensor]) -> tuple[memoryview, bytes]:
    """The buffer and metadata the agent would hold for this state (the client's layout)."""
    flat = flatten(state)
    layout = compute_layout(flat.specs)
    buffer = torch.empty(layout.size_bytes, dtype=torch.uint8)
    offsets = [p.offset for p in layout.placements]
    for tensor, offset in zip(flat.tensors, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        buffer[offset : offset + nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
    return memoryview(buffer.numpy()), encode_meta(flat, offsets, layout.size_bytes, world_size=1)


def drop_caches() -> bool:
    """Empties the page cache so loads read the disk; False when not allowed (not root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_persist(buffer: memoryview, meta: bytes, scratch: Path) -> float:
    directory = scratch / "step-000000000001"
    started = time.perf_counter()
    result = dcp.write_rank(directory, 0, buffer, meta)
    dcp.finalize(directory, [result], world_size=1)
    return time.perf_counter() - started


def time_dd(size_bytes: int, scratch: Path) -> float:
    block = 8 << 20
    count = -(-size_bytes // block)
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={scratch / 'dd.bin'}", f"bs={block}", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    return elapsed * size_bytes / (count * block)  # dd wrote whole blocks: the same bytes' share


def time_load(directory: Path, state: dict[str, torch.Tensor], through_memckpt: bool, cold: bool) -> float:
    target = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    if cold:
        drop_caches()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is (disabled, )?unavailable")
        if through_memckpt:  # what Checkpointer._restore_persisted does
            how = load_persisted(target, directory, rank=0, world_size=1)
            assert how == EXACT, how
        else:
            dcp_load(target, checkpoint_id=directory)
    elapsed = time.perf_counter() - started
    if any(not torch.equal(target[name], tensor) for name, tensor in state.items()):
        raise RuntimeError("the load gave back other bytes than were persisted")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="snapshot size (default: 1GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement, alternating (default: 3)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="filesystem to write to (default: tmp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    state = make_state(args.size)
    buffer, meta = snapshot_of(state)
    size = len(buffer)
    scratch = Path(tempfile.mkdtemp(prefix="memckpt-persist-bench-", dir=args.dir))
    persist_s, dd_s, memckpt_load_s, dcp_load_s = [], [], [], []
    cold = os.geteuid() == 0
    try:
        for i in range(args.rounds):
            for name in ("persist", "dd") if i % 2 == 0 else ("dd", "persist"):
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                drop_caches()
                if name == "persist":
                    persist_s.append(time_persist(buffer, meta, scratch))
                else:
                    dd_s.append(time_dd(size, scratch))
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        time_persist(buffer, meta, scratch)
        checkpoint = scratch / "step-000000000001"
        for i in range(args.rounds):
            for through_memckpt in (True, False) if i % 2 == 0 else (False, True):
                (memckpt_load_s if through_memckpt else dcp_load_s).append(time_load(checkpoint, state, through_memckpt, cold))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "size_bytes": size,
        "rounds": args.rounds,
        "dir": str(args.dir),
        "persist_gbps": size / statistics.median(persist_s) / 1e9,
        "dd_gbps": size / statistics.median(dd_s) / 1e9,
        "memckpt_fs_restore_s": statistics.median(memckpt_load_s),
        "dcp_load_s": statistics.median(dcp_load_s),
        "loads_from_disk": cold,
        "samples": {"persist_s": persist_s, "dd_s": dd_s, "memckpt_fs_restore_s": memckpt_load_s, "dcp_load_s": dcp_load_s},
    }
    report["persist_vs_dd"] = report["persist_gbps"] / report["dd_gbps"]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"persist of {size / 2**30:.2f} GiB to {args.dir} ({args.rounds} rounds, medians; loads from disk: {cold})")
    rows = [
        ("write + fsync", "GB/s", f"{report['persist_gbps']:.2f}", f"dd conv=fsync {report['dd_gbps']:.2f}",
         f"{report['persist_vs_dd']:.0%} of dd (target >= 80%)"),
        ("restore", "s", f"{report['memckpt_fs_restore_s']:.3f}", f"dcp.load {report['dcp_load_s']:.3f}",
         "memckpt <= dcp.load" if report["memckpt_fs_restore_s"] <= report["dcp_load_s"] else "memckpt slower"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
