"""How fast memckpt erasure-codes a snapshot, and how fast a lost rank comes back from fragments.

Codec: encode and decode GB/s per core (one thread) of memckpt's codec (agent/erasure.py: XOR
for m = 1, zfec for m >= 2) for (k, m) in (2, 1), (4, 2), (8, 2), beside zfec's own encode of the
same fragments and a numpy XOR of two halves, measured in the same run. GB/s counts the
snapshot's bytes. A decode rebuilds the m lowest data fragments from the others (the worst case).

Reconstruct: a real coordinator (k=2, m=1 by default) and k+m+1 agents on loopback; a
Checkpointer snapshots on node0, and once the coordinator says the step is protected node0 is
SIGKILLed and its shared memory removed, as if the node were lost. A replacement agent joins,
and `Checkpointer.restore(..., coordinate=False)` on it is timed, into the trainer's
(preallocated, touched) tensors. Two ways, each repeat on new replacements, taken in turns:
the default one, where the agent hands the trainer tickets and the trainer fetches the k data
fragments from their holders itself, straight into its tensors, checking them against the
owner's checksums (trainer/direct.py); and, with the replacement's `--no-direct-restore`, the
agent's rebuild: fetching k fragments into a new slot, decoding, verifying, and the trainer
copying from the slot. Beside them, in the same run: the same bytes streamed over a raw TCP
loopback socket, and torch.load of the same state from local disk.

    python bench/ec_throughput.py --size 1GiB [--repeats 3] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import baselines
import loopback
import numpy as np
import psutil
import torch
import zfec
from loopback import gbps, median_after_first, progress

from memckpt.agent.erasure import Scheme, data_fragment, decode, encode_parity
from memckpt.local import wait_until
from memckpt.trainer.checkpointer import Checkpointer

QUIET_CPU = 0.1  # cores per agent below which the group counts as idle between reconstruct samples

SCHEMES = ((2, 1), (4, 2), (8, 2))
ZFEC_REFERENCE = "4,2"  # the scheme whose zfec figure is `zfec_encode_gbps`
QUICK_SIZE = "16MiB"


@dataclass(frozen=True, slots=True, kw_only=True)
class EcReport:
    size_bytes: int
    repeats: int
    encode_gbps: dict[str, float]  # memckpt's encode_parity, one thread, by "k,m"
    decode_gbps: dict[str, float]  # memckpt's decode of m lost data fragments, one thread
    zfec_encode_gbps_by_scheme: dict[str, float]  # zfec.Encoder on whole fragments, one call
    zfec_encode_gbps: float  # at ZFEC_REFERENCE
    xor_gbps: float  # numpy XOR of the two halves of the snapshot into a touched buffer
    reconstruct_k: int
    reconstruct_m: int
    reconstruct_s: float  # median over the replacements, the default way (the trainer fetches the fragments)
    reconstruct_samples_s: tuple[float, ...]
    reconstruct_rebuild_s: float  # the same, with the replacement agent rebuilding the snapshot (--no-direct-restore)
    reconstruct_rebuild_samples_s: tuple[float, ...]
    reconstruct_bytes: int
    reconstruct_gbps: float
    raw_socket_s: float
    raw_socket_gbps: float
    torch_load_s: float
    reconstruct_over_raw_socket: float  # the target: >= 0.5
    torch_load_over_reconstruct: float  # the target: >= 1


def _best_rate(size_bytes: int, call: Callable[[], object], repeats: int) -> float:
    """GB/s of the median call after a first one (which pays allocation and page faults)."""
    samples_s = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        call()
        samples_s.append(time.perf_counter() - start)
    return gbps(size_bytes, median_after_first(samples_s))


def measure_codec(data: memoryview, repeats: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    encode_rates, decode_rates, zfec_rates = {}, {}, {}
    size = len(data)
    for k, m in SCHEMES:
        name = f"{k},{m}"
        scheme = Scheme(k=k, m=m, size_bytes=size)
        parity = encode_parity(data, scheme)
        encode_rates[name] = _best_rate(size, lambda scheme=scheme: encode_parity(data, scheme), repeats)
        # any k fragments: the data fragments past the first m, then every parity
        survivors: dict[int, memoryview | bytes] = {i: data_fragment(data, scheme, i) for i in range(m, k)}
        survivors |= {k + j: memoryview(p) for j, p in enumerate(parity)}
        rebuilt = decode(survivors, scheme)
        if rebuilt != data:
            raise RuntimeError(f"decode of ({k}, {m}) gave back different bytes")
        del rebuilt
        decode_rates[name] = _best_rate(size, lambda scheme=scheme, s=survivors: decode(s, scheme), repeats)
        fragments = tuple(data_fragment(data, scheme, i) for i in range(k))  # the last one padded, as encode_parity does
        encoder = zfec.Encoder(k, k + m)
        wanted = tuple(range(k, k + m))
        zfec_rates[name] = _best_rate(size, lambda e=encoder, f=fragments, w=wanted: e.encode(f, w), repeats)
        progress(
            f"codec ({k},{m}): memckpt encode {encode_rates[name]:.2f} GB/s, decode {decode_rates[name]:.2f} GB/s, "
            f"zfec encode {zfec_rates[name]:.2f} GB/s"
        )
        del parity, survivors, fragments
    return encode_rates, decode_rates, zfec_rates


def measure_xor(data: memoryview, repeats: int) -> float:
    half = len(data) // 2
    a = np.frombuffer(data, dtype=np.uint8, count=half)
    b = np.frombuffer(data, dtype=np.uint8, count=half, offset=half)
    out = np.zeros(half, dtype=np.uint8)
    rate = _best_rate(2 * half, lambda: np.bitwise_xor(a, b, out=out), repeats)
    progress(f"numpy XOR: {rate:.2f} GB/s")
    return rate


def _restore_on_replacement(
    group: loopback.LocalGroup, node: str, job: str, state: dict[str, torch.Tensor], direct: bool
) -> float:
    replacement = group.start_agent(node, () if direct else ("--no-direct-restore",))
    wait_until(lambda: node in group.addresses(), 60, f"{node} to join the group", interval_s=0.1)
    destination = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    with Checkpointer(job, rank=0, world_size=1, socket_path=replacement.socket_path, strict=True) as ck:
        start = time.perf_counter()
        step = ck.restore(destination, coordinate=False)
        elapsed = time.perf_counter() - start
        source = ck.restored_from
    if step != 1 or any(not torch.equal(destination[name], tensor) for name, tensor in state.items()):
        raise RuntimeError(f"the restore on {node} gave back step {step} or different bytes")
    if source != "fragments":
        raise RuntimeError(f"the restore on {node} came from {source!r}, not from fragments")
    how = "direct" if direct else "rebuild"
    progress(f"reconstruct ({how}) on {node}: {elapsed:.3f} s ({gbps(sum(t.nbytes for t in state.values()), elapsed):.2f} GB/s)")
    lines = replacement.log_path.read_text().splitlines()
    said = [line for line in lines if "rebuilt job=" in line or "direct restore of job=" in line]
    for line in said:
        progress(f"  {node}: {line}")
    if direct != any("direct restore of job=" in line for line in said):
        raise RuntimeError(f"the restore on {node} was not the {how} one: {said}")
    return elapsed


def _wait_quiet(group: loopback.LocalGroup, timeout_s: float = 20.0) -> None:
    """Waits until the agents are idle (under QUIET_CPU of a core each over 0.3 s): a replacement
    re-protects the rank it rebuilt, and its puts (cut short by its stop) must not overlap the next
    replacement's fetch, or the sample measures the two together."""
    processes = [psutil.Process(agent.pid) for agent in group.agents.values()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = [p.cpu_times() for p in processes]
        time.sleep(0.3)
        busy = [(a.user + a.system - b.user - b.system) / 0.3 for a, b in zip((p.cpu_times() for p in processes), before)]
        if max(busy) < QUIET_CPU:
            return
    progress(f"warning: agents still busy after {timeout_s:.0f} s; measuring anyway")


def measure_reconstruct(state: dict[str, torch.Tensor], k: int, m: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each restore from fragments, on a new replacement agent each time: (the trainer
    fetching the fragments, the agent rebuilding the snapshot), taken in turns."""
    size = sum(t.nbytes for t in state.values())
    job = f"ec-{uuid.uuid4().hex[:8]}"
    with loopback.local_group(k + m + 1, k, m, memory_limit_bytes=3 * size + (1 << 30)) as group:
        with Checkpointer(job, rank=0, world_size=1, socket_path=group.agents["node0"].socket_path, strict=True) as ck:
            handle = ck.snapshot(1, state)
            ck.wait()
            if not handle.committed:
                raise RuntimeError(f"the snapshot failed: {handle.error!r}")
        started = time.perf_counter()
        wait_until(lambda: group.protected_step(job, 0) == 1, 300, "the snapshot to be protected", interval_s=0.1)
        progress(f"snapshot of {size} bytes protected after {time.perf_counter() - started:.2f} s; losing node0")
        group.lose("node0")
        wait_until(lambda: "node0" not in group.addresses(), 60, "the coordinator to see node0 gone", interval_s=0.1)
        samples_s: dict[bool, list[float]] = {True: [], False: []}
        for i in range(2 * max(1, repeats)):
            node, direct = f"node{k + m + 1 + i}", i % 2 == 0
            _wait_quiet(group)
            samples_s[direct].append(_restore_on_replacement(group, node, job, state, direct))
            group.agents.pop(node).stop()  # clean stop: it removes its slots; the fragments stay on the holders
    return samples_s[True], samples_s[False]


def run(size_bytes: int, repeats: int, directory: str, k: int, m: int) -> EcReport:
    state = baselines.make_state(size_bytes)
    size = sum(t.nbytes for t in state.values())
    data = memoryview(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).data).cast("B")
    progress(f"{size} bytes, {repeats} repeats after the first")
    encode_rates, decode_rates, zfec_rates = measure_codec(data, repeats)
    xor_rate = measure_xor(data, repeats)
    del data
    raw_s = median_after_first(loopback.raw_socket_seconds(size, repeats))
    progress(f"raw socket: {raw_s:.3f} s ({gbps(size, raw_s):.2f} GB/s)")
    reconstruct_samples, rebuild_samples = measure_reconstruct(state, k, m, repeats)
    reconstruct_s = statistics.median(reconstruct_samples)
    torch_load_s = baselines.measure_torch_load(state, directory, repeats).median_s
    progress(f"torch.load: {torch_load_s:.3f} s")
    return EcReport(
        size_bytes=size,
        repeats=repeats,
        encode_gbps=encode_rates,
        decode_gbps=decode_rates,
        zfec_encode_gbps_by_scheme=zfec_rates,
        zfec_encode_gbps=zfec_rates[ZFEC_REFERENCE],
        xor_gbps=xor_rate,
        reconstruct_k=k,
        reconstruct_m=m,
        reconstruct_s=reconstruct_s,
        reconstruct_samples_s=tuple(reconstruct_samples),
        reconstruct_rebuild_s=statistics.median(rebuild_samples),
        reconstruct_rebuild_samples_s=tuple(rebuild_samples),
        reconstruct_bytes=size,
        reconstruct_gbps=gbps(size, reconstruct_s),
        raw_socket_s=raw_s,
        raw_socket_gbps=gbps(size, raw_s),
        torch_load_s=torch_load_s,
        reconstruct_over_raw_socket=gbps(size, reconstruct_s) / gbps(size, raw_s),
        torch_load_over_reconstruct=torch_load_s / reconstruct_s,
    )


def format_table(r: EcReport) -> str:
    lines = [
        f"size {r.size_bytes} bytes ({r.size_bytes / 2**30:.2f} GiB), codec GB/s on one core, "
        f"median of {r.repeats} repeats after the first",
        f"{'k,m':<5} | {'memckpt encode':>14} | {'memckpt decode':>14} | {'zfec encode':>11}",
    ]
    for name in r.encode_gbps:
        lines.append(
            f"{name:<5} | {r.encode_gbps[name]:14.2f} | {r.decode_gbps[name]:14.2f} | {r.zfec_encode_gbps_by_scheme[name]:11.2f}"
        )
    lines.append(f"numpy XOR of two halves: {r.xor_gbps:.2f} GB/s")
    lines.append(f"-- reconstruct of a lost rank ({r.reconstruct_k},{r.reconstruct_m}), {r.reconstruct_bytes} bytes")
    lines.append(f"{'method':<50} | {'s':>7} | {'GB/s':>6}")
    rows = [
        ("memckpt restore from fragments (the rank fetches)", r.reconstruct_s),
        ("memckpt restore, rebuilt by the agent (no direct)", r.reconstruct_rebuild_s),
        ("raw TCP socket, same bytes", r.raw_socket_s),
        ("torch.load from local disk", r.torch_load_s),
    ]
    for name, seconds in rows:
        lines.append(f"{name:<50} | {seconds:7.3f} | {gbps(r.reconstruct_bytes, seconds):6.2f}")
    lines.append(f"reconstruct samples s: {', '.join(f'{s:.3f}' for s in r.reconstruct_samples_s)}")
    lines.append(f"rebuilt by the agent, samples s: {', '.join(f'{s:.3f}' for s in r.reconstruct_rebuild_samples_s)}")
    lines.append(
        f"reconstruct / raw socket rate: {r.reconstruct_over_raw_socket:.2f} (target >= 0.5); "
        f"torch.load / reconstruct time: {r.torch_load_over_reconstruct:.2f} (target >= 1)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=baselines.parse_size, default=None, help="snapshot size (default: 1GiB; --quick: 16MiB)")
    parser.add_argument("--repeats", type=int, default=None, help="calls after the first one (default: 3; --quick: 1)")
    parser.add_argument("--k", type=int, default=2, help="data fragments of the reconstruct (default: 2)")
    parser.add_argument("--m", type=int, default=1, help="parity fragments of the reconstruct (default: 1)")
    parser.add_argument("--directory", default=tempfile.gettempdir(), help="where torch.save writes, on local disk")
    parser.add_argument("--quick", action="store_true", help=f"a small fast run: {QUICK_SIZE}, one repeat")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    size = args.size if args.size is not None else baselines.parse_size(QUICK_SIZE if args.quick else "1GiB")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    report = run(size, repeats, args.directory, args.k, args.m)
    print(json.dumps(dataclasses.asdict(report)) if args.json else format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
