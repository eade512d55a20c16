"""`memckpt`: the command line for people who run training clusters.

memckpt demo             a local cluster loses a rank, then a node, and resumes from memory
memckpt status           what the node agent holds (ranks, slots, steps, memory)
memckpt release JOB      drops a finished job's snapshots from the agent
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from memckpt.agent.config import SOCKET_ENV, default_socket
from memckpt.agent.wire import STATE_NAMES
from memckpt.errors import MemckptError
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.protos import coordinator_pb2, coordinator_pb2_grpc
from memckpt.rpc import error_from_rpc
from memckpt.security import TlsFiles, channel_credentials, token_metadata
from memckpt.sizes import format_size


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, help=f"the agent's unix socket (default: ${SOCKET_ENV}, else {default_socket()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run a local cluster and job, kill a rank and a node, resume from memory, compare with an undisturbed run",
    )
    demo.add_argument("--ranks", type=int, default=2, help="trainer ranks under torchrun, 2-4 (default: 2)")
    demo.add_argument("--nodes", type=int, help="agents, one per simulated node, at least 4 (default: max(4, ranks))")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    demo.add_argument("--snapshot-every", type=int, default=1, help="snapshot every N steps (default: 1)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the run and of the fault steps (default: 0)")
    demo.add_argument("--preset", default="small", choices=["tiny", "small", "default"], help="model size (default: small)")
    demo.add_argument(
        "--faults",
        default="rank,node",
        help="faults in order, comma-separated: rank (SIGKILL of a trainer rank), node (its agent, rank and "
        "shared memory lost; a replacement joins) (default: rank,node)",
    )
    demo.add_argument("--kill-rank", type=int, default=1, help="rank hit by the faults (default: 1)")
    demo.add_argument("--fault-steps", help="comma-separated step after which each fault strikes (default: drawn from the seed)")
    demo.add_argument("--workdir", type=Path, help="keep sockets, logs and events here (default: a temp dir, removed)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    status = sub.add_parser("status", help="what the local agent holds, or the whole cluster (--coordinator)")
    _socket_arg(status)
    status.add_argument("--coordinator", metavar="HOST:PORT", help="show the cluster as the coordinator sees it")
    status.add_argument(
        "--token", default=os.environ.get("MEMCKPT_TOKEN", ""), help="the cluster token (default: $MEMCKPT_TOKEN)"
    )
    status.add_argument("--tls-ca", type=Path, help="CA of the coordinator's certificate (TLS)")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    release = sub.add_parser("release", help="drop a finished job's snapshots from the local agent")
    release.add_argument("job")
    _socket_arg(release)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"demo": cmd_demo, "status": cmd_status, "release": cmd_release}[args.command](args)
    except MemckptError as exc:
        print(f"memckpt {args.command}: {exc}", file=sys.stderr)
        return 1


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, pb_grpc.AgentServiceStub, Path]:
    path = args.socket or Path(os.environ.get(SOCKET_ENV) or default_socket())
    channel = grpc.insecure_channel(f"unix:{path}")
    return channel, pb_grpc.AgentServiceStub(channel), path


def cmd_status(args: argparse.Namespace) -> int:
    if args.coordinator:
        return cmd_cluster_status(args)
    channel, stub, path = _stub(args)
    with channel:
        try:
            reply = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"agent at {path}") from None
    if args.json:
        print(json.dumps(status_to_json(reply), indent=2))
        return 0
    print(f"agent node={reply.node} pid={reply.pid} version={reply.version} socket={path}")
    print(f"memory {format_size(reply.memory_used_bytes)} used of {format_size(reply.memory_limit_bytes)} budget")
    rows = [("JOB", "RANK", "WORLD", "COMMITTED", "SLOTS")]
    for r in reply.ranks:
        slots = "  ".join(
            f"s{s.index}:{STATE_NAMES.get(s.state, '?')}"
            + (f"@{s.step}" if s.step >= 0 else "")
            + f" {format_size(s.size_bytes)}"
            + ("" if s.checksum_ready or s.state != pb.SLOT_STATE_COMMITTED else " (checksumming)")
            for s in r.slots
        )
        rows.append((r.job, str(r.rank), str(r.world_size), str(r.committed_step) if r.has_committed else "-", slots))
    _print_table(rows)
    return 0


def status_to_json(reply: pb.GetStatusResponse) -> dict[str, Any]:
    return {
        "node": reply.node,
        "pid": reply.pid,
        "version": reply.version,
        "memory_used_bytes": reply.memory_used_bytes,
        "memory_limit_bytes": reply.memory_limit_bytes,
        "ranks": [
            {
                "job": r.job,
                "rank": r.rank,
                "world_size": r.world_size,
                "committed_step": r.committed_step if r.has_committed else None,
                "slots": [
                    {
                        "index": s.index,
                        "name": s.name,
                        "state": STATE_NAMES.get(s.state, "unspecified"),
                        "step": s.step,
                        "size_bytes": s.size_bytes,
                        "data_size_bytes": s.data_size_bytes,
                        "checksum_ready": s.checksum_ready,
                    }
                    for s in r.slots
                ],
            }
            for r in reply.ranks
        ],
    }


def cmd_cluster_status(args: argparse.Namespace) -> int:
    credentials = channel_credentials(TlsFiles(ca=args.tls_ca))
    channel = grpc.secure_channel(args.coordinator, credentials) if credentials else grpc.insecure_channel(args.coordinator)
    with channel:
        try:
            reply = coordinator_pb2_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
                coordinator_pb2.GetClusterStatusRequest(), metadata=token_metadata(args.token), timeout=10
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"coordinator at {args.coordinator}") from None
    agents = [
        {
            "node": a.agent.node,
            "address": a.agent.address,
            "domain": a.agent.domain,
            "alive": a.alive,
            "group": a.group if a.group >= 0 else None,
            "memory_used_bytes": a.memory_used_bytes,
            "memory_budget_bytes": a.agent.capacity_bytes,
        }
        for a in reply.agents
    ]
    jobs = [
        {
            "job": j.job,
            "generation": j.generation,
            "world_size": j.world_size,
            "ranks": [{"rank": r.rank, "committed_step": r.committed_step, "protected_step": r.protected_step} for r in j.ranks],
        }
        for j in reply.jobs
    ]
    if args.json:
        print(json.dumps({"agents": agents, "jobs": jobs}, indent=2))
        return 0
    rows = [("NODE", "ALIVE", "GROUP", "DOMAIN", "MEMORY", "ADDRESS")]
    for a in agents:
        memory = f"{format_size(a['memory_used_bytes'])} / {format_size(a['memory_budget_bytes'])}"
        group = "-" if a["group"] is None else str(a["group"])
        rows.append((a["node"], "yes" if a["alive"] else "FAILED", group, a["domain"], memory, a["address"]))
    _print_table(rows)
    print()
    job_rows = [("JOB", "GENERATION", "RANK", "COMMITTED", "PROTECTED")]
    for j in jobs:
        for r in j["ranks"]:
            protected = str(r["protected_step"]) if r["protected_step"] >= 0 else "-"
            job_rows.append((str(j["job"]), str(j["generation"]), str(r["rank"]), str(r["committed_step"]), protected))
    _print_table(job_rows)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    channel, stub, path = _stub(args)
    with channel:
        try:
            reply = stub.ReleaseJob(pb.ReleaseJobRequest(job=args.job), timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"agent at {path}") from None
    print(f"released job {args.job}: {reply.ranks_released} ranks, {format_size(reply.bytes_released)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from memckpt.demo import DemoConfig, run_demo

    try:
        config = DemoConfig(
            ranks=args.ranks,
            nodes=args.nodes or max(4, args.ranks),
            steps=args.steps,
            snapshot_every=args.snapshot_every,
            seed=args.seed,
            preset=args.preset,
            faults=tuple(f for f in args.faults.split(",") if f),
            kill_rank=args.kill_rank,
            fault_steps=tuple(int(s) for s in args.fault_steps.split(",")) if args.fault_steps else None,
            workdir=args.workdir,
        )
        if not 2 <= config.ranks <= 4:
            raise ValueError("--ranks must be 2-4")
    except ValueError as exc:
        print(f"memckpt demo: {exc}", file=sys.stderr)
        return 2
    progress = (lambda _msg: None) if args.json else (lambda msg: print(msg, flush=True))
    result = run_demo(config, progress=progress)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0 if result.bit_exact else 1
    print()
    rows = [("", "value")]
    for r in result.recoveries:
        what = f"rank {r.rank} killed (SIGKILL)" if r.fault == "rank" else f"node {r.lost_node} lost (rank {r.rank})"
        sources = ", ".join(f"r{rank}:{source}" for rank, source in sorted(r.sources.items()))
        rows += [
            (f"{what} after step", str(r.killed_after_step)),
            ("  step restored from memory", f"{r.restored_step} ({r.steps_recomputed} steps recomputed)"),
            ("  where each rank's state came from", sources),
            ("  recovery (kill -> all ranks restored)", f"{r.recovery_s:.2f} s"),
            ("  of which restore from memory", f"{r.restore_s * 1e3:.1f} ms"),
        ]
    rows += [
        ("final loss", f"{result.final_loss:.6f}"),
        ("final loss, uninterrupted run", f"{result.reference_final_loss:.6f}"),
        ("bit-exact with the uninterrupted run", "yes" if result.bit_exact else f"NO (steps {result.mismatched_steps})"),
    ]
    _print_table(rows)
    return 0 if result.bit_exact else 1
    print()
    _print_table(
        [
            ("", "value"),
            ("rank killed (SIGKILL) after step", str(result.kill_step)),
            ("step restored from memory", str(result.restored_step)),
            ("steps recomputed", str(result.steps_recomputed)),
            ("recovery (kill -> all ranks restored)", f"{result.recovery_s:.2f} s"),
            ("  of which restore from memory", f"{result.restore_s * 1e3:.1f} ms"),
            ("final loss", f"{result.final_loss:.6f}"),
            ("final loss, uninterrupted run", f"{result.reference_final_loss:.6f}"),
            ("bit-exact with the uninterrupted run", "yes" if result.bit_exact else f"NO (steps {result.mismatched_steps})"),
        ]
    )
    return 0 if result.bit_exact else 1


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
