"""`memckpt`: the command line for people who run training clusters.

memckpt demo             a local cluster loses a rank, then a node, and resumes from memory
memckpt status           what the node agent holds (ranks, slots, steps, memory)
memckpt release JOB      drops a finished job's snapshots and fragments on every node
memckpt drain NODE       moves a node's fragments and protection to other agents before maintenance
memckpt list             persisted checkpoints per job: step, size, time, state
memckpt verify PATH      is a persisted checkpoint complete and intact; if not, what is wrong
memckpt export PATH OUT  one consolidated torch.save file of a persisted checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from memckpt import drain_cli
from memckpt.agent.config import SOCKET_ENV, default_socket
from memckpt.agent.wire import STATE_NAMES
from memckpt.errors import MemckptError
from memckpt.progress import Progress
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc
from memckpt.protos import coordinator_pb2, coordinator_pb2_grpc
from memckpt.rpc import error_from_rpc
from memckpt.security import add_client_tls_flags, add_token_flags, channel_credentials, client_tls, client_token, token_metadata
from memckpt.sizes import format_size


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, help=f"the agent's unix socket (default: ${SOCKET_ENV}, else {default_socket()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
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
    add_token_flags(status)
    add_client_tls_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    release = sub.add_parser(
        "release",
        help="drop a finished job's snapshots and fragments on every node",
        description="Drops a finished job from memory. With a coordinator, every agent drops its slots and the "
        "fragments it holds for the job (this one at once, the others with their next heartbeat); persisted "
        "checkpoints stay. A rank still training re-registers with its next snapshot: release a job once it stopped.",
    )
    release.add_argument("job")
    release.add_argument(
        "--local",
        action="store_true",
        help="drop only this agent's slots of the job (when the coordinator cannot be reached); peers keep their fragments",
    )
    _socket_arg(release)

    drain_cli.add_parser(sub)

    listing = sub.add_parser("list", help="persisted checkpoints per job: step, size, time, state")
    listing.add_argument(
        "--root",
        type=Path,
        default=os.environ.get("MEMCKPT_PERSIST_ROOT"),
        help="the agents' --persist-root (default: $MEMCKPT_PERSIST_ROOT)",
    )
    listing.add_argument("--job", help="only this job")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")

    verify = sub.add_parser(
        "verify", help="check a persisted checkpoint: complete, every file's size and checksum; exit 1 if anything is wrong"
    )
    verify.add_argument("path", type=Path, help="a checkpoint directory (ROOT/JOB/step-N)")
    verify.add_argument("--no-checksums", action="store_true", help="check structure and sizes only, without reading the data")
    verify.add_argument("--json", action="store_true", help="print JSON for scripts")

    export = sub.add_parser("export", help="write a persisted checkpoint as one torch.save file (inference, no memckpt)")
    export.add_argument("path", type=Path, help="a complete checkpoint directory (ROOT/JOB/step-N)")
    export.add_argument("out", type=Path, help="the .pt file to write (written whole, then renamed into place)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {
            "demo": cmd_demo,
            "status": cmd_status,
            "release": cmd_release,
            "drain": drain_cli.cmd_drain,
            "list": cmd_list,
            "verify": cmd_verify,
            "export": cmd_export,
        }
        return commands[args.command](args)
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
    if reply.metrics_address:
        print(f"metrics on {reply.metrics_address} (/metrics, /healthz)")
    rows = [("JOB", "RANK", "WORLD", "COMMITTED", "RESTORED", "SLOTS")]
    for r in reply.ranks:
        slots = "  ".join(
            f"s{s.index}:{STATE_NAMES.get(s.state, '?')}"
            + (f"@{s.step}" if s.step >= 0 else "")
            + f" {format_size(s.size_bytes)}"
            + ("" if s.checksum_ready or s.state != pb.SLOT_STATE_COMMITTED else " (checksumming)")
            for s in r.slots
        )
        committed = str(r.committed_step) if r.has_committed else "-"
        restored = f"{r.restored_step} from {r.restored_from}" if r.restored_from else "-"
        rows.append((r.job, str(r.rank), str(r.world_size), committed, restored, slots))
    _print_table(rows)
    if reply.persist_root:
        print(f"persisting to {reply.persist_root}")
        persisted: list[tuple[str, ...]] = [("JOB", "COMPLETE", "WRITING", "WRITTEN", "FAILURES", "LAST ERROR")]
        for p in reply.persistence:
            persisted.append(
                (
                    p.job,
                    str(p.complete_step) if p.complete_step >= 0 else "-",
                    str(p.writing_step) if p.writing_step >= 0 else "-",
                    format_size(p.written_bytes),
                    str(p.failures),
                    p.last_error or "-",
                )
            )
        _print_table(persisted)
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
                "restored_from": r.restored_from or None,
                "restored_step": r.restored_step if r.restored_from else None,
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
        "persist_root": reply.persist_root or None,
        "metrics_address": reply.metrics_address or None,
        "persistence": [
            {
                "job": p.job,
                "complete_step": p.complete_step if p.complete_step >= 0 else None,
                "writing_step": p.writing_step if p.writing_step >= 0 else None,
                "written_bytes": p.written_bytes,
                "failures": p.failures,
                "last_error": p.last_error,
            }
            for p in reply.persistence
        ],
    }


def cmd_cluster_status(args: argparse.Namespace) -> int:
    credentials = channel_credentials(client_tls(args))
    channel = grpc.secure_channel(args.coordinator, credentials) if credentials else grpc.insecure_channel(args.coordinator)
    with channel:
        try:
            reply = coordinator_pb2_grpc.CoordinatorServiceStub(channel).GetClusterStatus(
                coordinator_pb2.GetClusterStatusRequest(), metadata=token_metadata(client_token(args)), timeout=10
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
            "draining": a.drain.draining,
            "drain": _drain_json(a.drain) if a.drain.draining else None,
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
        print(json.dumps({"agents": agents, "jobs": jobs, "metrics_address": reply.metrics_address or None}, indent=2))
        return 0
    if reply.metrics_address:
        print(f"coordinator metrics on {reply.metrics_address} (/metrics, /healthz)")
    rows = [("NODE", "ALIVE", "GROUP", "DOMAIN", "MEMORY", "ADDRESS")]
    for a in agents:
        memory = f"{format_size(a['memory_used_bytes'])} / {format_size(a['memory_budget_bytes'])}"
        group = "-" if a["group"] is None else str(a["group"])
        alive = "yes" if a["alive"] else "FAILED"
        if a["alive"] and a["drain"] is not None:
            alive = "DRAINED" if a["drain"]["drained"] else "DRAINING"
        rows.append((a["node"], alive, group, a["domain"], memory, a["address"]))
    _print_table(rows)
    for a in agents:
        if a["alive"] and a["drain"] is not None:
            reason = a["drain"]["reason"]
            print(f"  {reason}" if reason.startswith(f"{a['node']} ") else f"  {a['node']}: {reason}")
    print()
    job_rows = [("JOB", "GENERATION", "RANK", "COMMITTED", "PROTECTED")]
    for j in jobs:
        for r in j["ranks"]:
            protected = str(r["protected_step"]) if r["protected_step"] >= 0 else "-"
            job_rows.append((str(j["job"]), str(j["generation"]), str(r["rank"]), str(r["committed_step"]), protected))
    _print_table(job_rows)
    return 0


def _drain_json(drain: coordinator_pb2.DrainStatus) -> dict[str, Any]:
    return {
        "drained": drain.drained,
        "fragment_sets_held": drain.fragment_sets_held,
        "ranks_owned": drain.ranks_owned,
        "ranks_protected": drain.ranks_protected,
        "reason": drain.reason,
    }


def cmd_release(args: argparse.Namespace) -> int:
    channel, stub, path = _stub(args)
    with channel:
        try:
            reply = stub.ReleaseJob(pb.ReleaseJobRequest(job=args.job, local_only=args.local), timeout=30)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"agent at {path}") from None
    here = f"released job {args.job}: {reply.ranks_released} rank(s), {format_size(reply.bytes_released)} on this node"
    if reply.cluster_wide:
        print(f"{here}; {reply.nodes_holding} node(s) held slots or fragments of it and drop them with their next heartbeat")
    else:
        print(f"{here}; other nodes were not asked (no coordinator, or --local)")
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


def cmd_list(args: argparse.Namespace) -> int:
    from memckpt.agent import checkpoints

    if args.root is None:
        print("memckpt list: --root (or $MEMCKPT_PERSIST_ROOT) must say where checkpoints are", file=sys.stderr)
        return 2
    root = Path(args.root)
    if not root.is_dir():
        print(f"memckpt list: {root} is not a directory", file=sys.stderr)
        return 2
    jobs = [args.job] if args.job else sorted(p.name for p in root.iterdir() if p.is_dir())
    found = [(job, c, checkpoints.describe(c)) for job in jobs for c in checkpoints.list_checkpoints(root, job)]
    if args.json:
        rows_json = [
            {"job": job, "step": c.step, "complete": c.complete, "size_bytes": size, "mtime": mtime, "path": str(c.path)}
            for job, c, (size, mtime) in found
        ]
        print(json.dumps(rows_json, indent=2))
        return 0
    if not found:
        print(f"no checkpoints under {root}" + (f" for job {args.job!r}" if args.job else ""))
        return 0
    rows = [("JOB", "STEP", "STATE", "SIZE", "TIME (UTC)", "PATH")]
    for job, c, (size, mtime) in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime))
        rows.append((job, str(c.step), "complete" if c.complete else "incomplete", format_size(size), when, str(c.path)))
    _print_table(rows)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from memckpt.agent.dcp_verify import verify

    progress = Progress(f"verifying {args.path}", 0)
    report = verify(args.path, checksums=not args.no_checksums, progress=lambda done, total: _show(progress, done, total))
    progress.end()
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(report.directory),
                    "complete": report.complete,
                    "ok": report.is_ok,
                    "problems": list(report.problems),
                    "notes": list(report.notes),
                    "checked_bytes": report.checked_bytes,
                },
                indent=2,
            )
        )
        return 0 if report.is_ok else 1
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if report.is_ok:
        print(f"OK: {report.directory} is complete and intact ({format_size(report.checked_bytes)} checked)")
        return 0
    print(f"FAILED: {report.directory}: {len(report.problems)} problem(s)")
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from memckpt.agent.dcp import is_complete

    if not is_complete(args.path):
        print(f"memckpt export: {args.path} is not a complete checkpoint (no .metadata); see `memckpt verify`", file=sys.stderr)
        return 1
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    print(f"exporting {args.path} to {args.out} ...", flush=True)
    started = time.perf_counter()
    # the output grows as torch.save writes it: about the size of the checkpoint's data files
    progress = Progress("exporting", sum(p.stat().st_size for p in args.path.glob("__*_*.distcp")))
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            progress.update(tmp.stat().st_size if tmp.exists() else 0)

    watcher = threading.Thread(target=watch, name="export-progress", daemon=True)
    watcher.start()
    try:
        dcp_to_torch_save(args.path, tmp)
        os.replace(tmp, args.out)
    finally:
        done.set()
        watcher.join()
        progress.end()
        tmp.unlink(missing_ok=True)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({format_size(size)}) in {time.perf_counter() - started:.1f} s; load it with torch.load")
    return 0


def _show(progress: Progress, done: int, total: int) -> None:
    progress.total_bytes = total
    progress.update(done)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
