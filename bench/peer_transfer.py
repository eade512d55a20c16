"""How fast a fragment streams between agents on loopback, beside a raw TCP socket.

A real coordinator (k=2, m=1) and k+m+1 agents; a Checkpointer snapshots on node0 and the agent
protects it, so every holder really holds the fragment the coordinator placed there. Then, from
this process, through memckpt.agent.peers.PeerClient (what agents use with each other):

- get: GetFragment of fragment 0 out of its holder, into a preallocated, touched buffer (every
  chunk's crc32c and the whole fragment's checked), as a rebuild receives it;
- put: PutFragment of the same bytes into the same holder, as a newer step of the same owner,
  so the holder checks, places and stores it in shared memory, as protection sends it. A
  holder receives each step of a rank into the segment of a step it dropped (still mapped in):
  its first puts of a rank allocate those segments instead (as the first steps of a job do),
  so WARMUP_PUTS puts go first, reported apart (`put_first_samples_s`), and the puts timed
  are the steady state, what every later step of a job costs;

and the same number of bytes over a raw TCP loopback socket (sendall from a child process into
a touched buffer with recv_into). `peer_gbps` is the slower of get and put (both are reported:
`get_gbps`, `put_gbps`, and each over the raw socket). This process sets
glibc's malloc the way the agent daemon does for itself (memckpt.agent.daemon.tune_allocator),
since in production the client side of a transfer is an agent too.

`--tls`: every agent, the coordinator and the client with mutual TLS (a throwaway CA made with
openssl), as the shipped Kubernetes config runs them: the bulk channel is then TLS too.
`--transport grpc`: the client sends and fetches in gRPC streams, not on the bulk channel.
`transport` and `tls` in the report say which was measured.

    python bench/peer_transfer.py --size 512MiB [--repeats 3] [--tls] [--transport {bulk,grpc}] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import baselines
import loopback
from loopback import gbps, median_after_first, progress

from memckpt.agent.daemon import tune_allocator
from memckpt.agent.fragments import FragmentHeader
from memckpt.agent.peers import PeerClient
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.local import make_test_certificates, wait_until
from memckpt.security import TlsFiles
from memckpt.trainer.checkpointer import Checkpointer

K, M = 2, 1
WARMUP_PUTS = 2  # steps that allocate the holder's segments for the rank (with the kept step's, three)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferReport:
    transport: str  # "bulk": the agents' bulk channel; "grpc": gRPC streams
    tls: bool
    fragment_bytes: int
    repeats: int
    get_s: float  # medians of the repeats after the first call
    put_s: float
    raw_socket_s: float
    get_samples_s: tuple[float, ...]
    put_samples_s: tuple[float, ...]
    put_first_samples_s: tuple[float, ...]  # the warm-up puts, into segments new to the holder
    raw_socket_samples_s: tuple[float, ...]
    get_gbps: float
    put_gbps: float
    peer_gbps: float  # the slower direction
    raw_socket_gbps: float
    peer_over_raw_socket: float  # the target: >= 0.6
    get_over_raw_socket: float
    put_over_raw_socket: float
    allocator: dict[str, int]


def _timed(call: object, count: int) -> list[float]:
    samples_s = []
    for i in range(count):
        start = time.perf_counter()
        call(i)  # type: ignore[operator]
        samples_s.append(time.perf_counter() - start)
    return samples_s


def measure_peer(
    fragment_bytes: int, repeats: int, tls: TlsFiles, bulk: bool
) -> tuple[list[float], list[float], list[float], int]:
    """Seconds of each get, each warm-up put and each put of fragment 0, and its size."""
    state = baselines.make_state(fragment_bytes * K, n_tensors=4)
    size = sum(t.nbytes for t in state.values())
    job = f"pt-{uuid.uuid4().hex[:8]}"
    with loopback.local_group(K + M + 1, K, M, memory_limit_bytes=4 * size + (1 << 30), tls=tls) as group:
        with Checkpointer(job, rank=0, world_size=1, socket_path=group.agents["node0"].socket_path, strict=True) as ck:
            handle = ck.snapshot(1, state)
            ck.wait()
            if not handle.committed:
                raise RuntimeError(f"the snapshot failed: {handle.error!r}")
        del state
        started = time.perf_counter()
        wait_until(lambda: group.protected_step(job, 0) == 1, 300, "the snapshot to be protected", interval_s=0.1)
        progress(f"snapshot protected after {time.perf_counter() - started:.2f} s (node0 put its fragments to its peers)")
        addresses = group.addresses()
        holder = choose_fragment_holders("node0", tuple(sorted(addresses)), K + M)[0]
        peers = PeerClient(token=loopback.TOKEN, tls=tls, bulk=bulk)
        try:
            header, _ = peers.get_fragment(addresses[holder], job, 0, 0, 1)
            target = bytearray(header.fragment_bytes)
            target[:] = bytes(header.fragment_bytes)  # touched, as the raw socket's
            into = memoryview(target)

            def get(_: int) -> None:
                peers.get_fragment(addresses[holder], job, 0, 0, 1, into=into)

            def put(i: int) -> None:
                newer = dataclasses.replace(header, step=header.step + 1 + i)  # as node0's next step
                peers.put_fragment(addresses[holder], newer, into)

            get_s = _timed(get, 1 + repeats)
            progress(f"get from {holder}: {', '.join(f'{s:.3f}' for s in get_s)} s")
            first_put_s = _timed(put, WARMUP_PUTS)
            put_s = _timed(lambda i: put(WARMUP_PUTS + i), 1 + repeats)
            warmup = ", ".join(f"{s:.3f}" for s in first_put_s)
            progress(f"put to {holder}: warm-up {warmup} s, then {', '.join(f'{s:.3f}' for s in put_s)} s")
            last_step = header.step + WARMUP_PUTS + 1 + repeats
            check: tuple[FragmentHeader, memoryview] = peers.get_fragment(addresses[holder], job, 0, 0, last_step)
            if check[1] != into:
                raise RuntimeError("the holder gave back other bytes than were put")
        finally:
            peers.close()
    return get_s, first_put_s, put_s, header.fragment_bytes


def run(fragment_bytes: int, repeats: int, tls: bool = False, transport: str = "bulk") -> TransferReport:
    allocator = tune_allocator()
    with tempfile.TemporaryDirectory(prefix="memckpt-bench-tls-") as directory:
        files = make_test_certificates(Path(directory)) if tls else TlsFiles()
        get_samples, first_put_samples, put_samples, size = measure_peer(fragment_bytes, repeats, files, transport == "bulk")
    raw_samples = loopback.raw_socket_seconds(size, repeats)
    progress(f"raw socket: {', '.join(f'{s:.3f}' for s in raw_samples)} s")
    get_s, put_s, raw_s = (median_after_first(s) for s in (get_samples, put_samples, raw_samples))
    peer = min(gbps(size, get_s), gbps(size, put_s))
    return TransferReport(
        transport=transport,
        tls=tls,
        fragment_bytes=size,
        repeats=repeats,
        get_s=get_s,
        put_s=put_s,
        raw_socket_s=raw_s,
        get_samples_s=tuple(get_samples),
        put_samples_s=tuple(put_samples),
        put_first_samples_s=tuple(first_put_samples),
        raw_socket_samples_s=tuple(raw_samples),
        get_gbps=gbps(size, get_s),
        put_gbps=gbps(size, put_s),
        peer_gbps=peer,
        raw_socket_gbps=gbps(size, raw_s),
        peer_over_raw_socket=peer / gbps(size, raw_s),
        get_over_raw_socket=raw_s / get_s,
        put_over_raw_socket=raw_s / put_s,
        allocator=allocator,
    )


def format_table(r: TransferReport) -> str:
    lines = [
        f"transport {r.transport}{', mutual TLS' if r.tls else ', no TLS'}; "
        f"fragment {r.fragment_bytes} bytes ({r.fragment_bytes / 2**20:.0f} MiB), median of {r.repeats} repeats after the first",
        f"{'method':<40} | {'s':>7} | {'GB/s':>6}",
    ]
    rows = [
        ("memckpt GetFragment (PeerClient)", r.get_s),
        ("memckpt PutFragment (PeerClient)", r.put_s),
        ("raw TCP socket sendall/recv_into", r.raw_socket_s),
    ]
    for name, seconds in rows:
        lines.append(f"{name:<40} | {seconds:7.3f} | {gbps(r.fragment_bytes, seconds):6.2f}")
    lines.append(
        f"samples s: get {', '.join(f'{s:.3f}' for s in r.get_samples_s)}; put {', '.join(f'{s:.3f}' for s in r.put_samples_s)}"
        f" (warm-up puts {', '.join(f'{s:.3f}' for s in r.put_first_samples_s)})"
    )
    lines.append(f"get / raw socket: {r.get_over_raw_socket:.2f}; put / raw socket: {r.put_over_raw_socket:.2f}")
    lines.append(f"peer (slower of get, put) / raw socket: {r.peer_over_raw_socket:.2f} (target >= 0.6); malloc: {r.allocator}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=baselines.parse_size, default=None, help="fragment size (default: 512MiB, a 1 GiB snapshot's at k=2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="transfers after the first one (default: 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a small fast run: 8MiB, one repeat")
    parser.add_argument("--tls", action="store_true", help="mutual TLS everywhere (a throwaway CA), as in production")
    parser.add_argument(
        "--transport", choices=("bulk", "grpc"), default="bulk", help="how the client moves fragments (default: bulk)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    size = args.size if args.size is not None else baselines.parse_size("8MiB" if args.quick else "512MiB")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    report = run(size, repeats, tls=args.tls, transport=args.transport)
    print(json.dumps(dataclasses.asdict(report)) if args.json else format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
