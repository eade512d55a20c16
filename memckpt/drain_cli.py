"""`memckpt drain NODE`: asks the coordinator to drain a node before maintenance, and shows how far it is.

The waiting is `watch_drain`, over an injected status source and clock, so tests drive it
without a coordinator; `cmd_drain` binds it to the coordinator's GetDrainStatus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import grpc

from memckpt.coordinator.drain import DrainProgress
from memckpt.coordinator.wire import drain_from_proto
from memckpt.errors import MemckptError
from memckpt.protos import coordinator_pb2 as pb
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.rpc import error_from_rpc
from memckpt.security import add_client_tls_flags, add_token_flags, channel_credentials, client_tls, client_token, token_metadata

POLL_S = 0.5
LINE_EVERY_S = 5.0  # without a terminal: a line at least this often, and at every change
BAR_WIDTH = 24
CALL_TIMEOUT_S = 10.0
REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)

DESCRIPTION = """\
Drains NODE before maintenance. It stays in the cluster and its own ranks stay protected (by
the other agents of its group), but it no longer holds erasure-coded fragments for other nodes:
their owners protect their steps on other agents (also when a job stands still, e.g. paused),
and NODE drops each fragment set it held once its job's kept step is protected without it. When
NODE holds nothing others need and each of its own ranks has a step protected on other agents,
it is drained: stopping or losing it then loses nothing that memory cannot restore.

The coordinator refuses a drain that would leave too few other agents to form a protection
group (k+m+1). A drain lasts until `memckpt drain NODE --undo`, or until NODE's agent restarts
(a new agent process registering ends it, e.g. after the maintenance); a restarted coordinator
forgets drains (run the command again). Ctrl-C stops watching; the drain goes on.

Exit status: 0 drained (or undone; or started, with --no-wait); 1 not drained within
--timeout-s, the drain ended meanwhile (undone, the node failed or restarted, the coordinator
restarted), or the coordinator is unreachable; 2 refused (unknown or failed node, too few
agents would remain, bad input)."""


def add_parser(sub: Any) -> None:
    """Adds `drain` to the `memckpt` subcommands."""
    drain = sub.add_parser(
        "drain",
        help="move a node's fragments and its ranks' protection to other agents before maintenance, with progress",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drain.add_argument("node", metavar="NODE", help="the node to drain (its agent's --node)")
    drain.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator")
    add_token_flags(drain)
    add_client_tls_flags(drain)
    drain.add_argument(
        "--timeout-s", type=float, default=600.0, metavar="S", help="give up waiting after S seconds (default: 600)"
    )
    drain.add_argument("--no-wait", action="store_true", help="start the drain and return at once")
    drain.add_argument("--undo", action="store_true", help="end the drain: the node holds fragments for others again")
    drain.add_argument("--json", action="store_true", help="print one JSON object at the end instead of progress")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    code: int  # the exit status
    result: str  # drained, timed_out, stopped, failed, unreachable
    message: str
    status: DrainProgress | None


def describe(status: DrainProgress) -> str:
    """One line: what the node still holds that others need."""
    sets, owned = status.fragment_sets_held, status.ranks_owned
    held = f"{sets} fragment set{_plural(sets)} still held for others" if sets else "no fragments held for others"
    ranks = f"{status.ranks_protected} of its {owned} rank{_plural(owned)} protected elsewhere" if owned else "no own ranks"
    return f"{status.node}: {held}, {ranks}"


def _plural(count: int) -> str:
    return "" if count == 1 else "s"


def fraction_done(status: DrainProgress, most_sets: int) -> float:
    """How much of the drain is done: fragment sets dropped (of the most seen) and ranks protected."""
    total = most_sets + status.ranks_owned
    if status.drained:
        return 1.0
    if total == 0:
        return 0.0
    done = (most_sets - status.fragment_sets_held) + status.ranks_protected
    return min(1.0, max(0.0, done / total))


def progress_bar(status: DrainProgress, most_sets: int, elapsed_s: float, width: int = BAR_WIDTH) -> str:
    filled = round(fraction_done(status, most_sets) * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {describe(status)} ({elapsed_s:.0f} s)"


def watch_drain(
    fetch: Callable[[], DrainProgress],
    *,
    timeout_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    show: Callable[[DrainProgress, int, float], None],
) -> Outcome:
    """Polls `fetch` until the node is drained, the drain ends, or `timeout_s` passes.

    `show(status, most_sets, elapsed_s)` is told each status fetched, with the most fragment
    sets seen held so far (what the bar counts down from). A failed fetch (the coordinator
    unreachable for a moment) is retried until the deadline.
    """
    started = clock()
    deadline = started + timeout_s
    most_sets = 0
    status: DrainProgress | None = None
    error = ""
    while True:
        try:
            status = fetch()
            error = ""
        except MemckptError as exc:
            error = str(exc)
        now = clock()
        if status is not None and not error:
            most_sets = max(most_sets, status.fragment_sets_held)
            show(status, most_sets, now - started)
            if ended := _ended(status):
                return ended
        if now >= deadline:
            if error:
                return Outcome(code=1, result="unreachable", message=f"coordinator: {error}", status=status)
            assert status is not None  # no error: fetched at least once
            message = f"{status.node} is not drained after {timeout_s:.0f} s: {status.reason}"
            return Outcome(code=1, result="timed_out", message=message, status=status)
        sleep(min(POLL_S, max(0.0, deadline - now)))


def _ended(status: DrainProgress) -> Outcome | None:
    if status.drained:
        return Outcome(code=0, result="drained", message=status.reason, status=status)
    if not status.alive:
        message = f"{status.node} failed before it was drained: {status.reason}"
        return Outcome(code=1, result="failed", message=message, status=status)
    if not status.draining:
        message = (
            f"{status.node} is no longer being drained (undone, its agent restarted, or the coordinator restarted); "
            "run the command again to drain it"
        )
        return Outcome(code=1, result="stopped", message=message, status=status)
    return None


class ProgressLine:
    """Shows progress: at a terminal one bar rewritten in place; otherwise plain lines, at every
    change and at least every LINE_EVERY_S."""

    def __init__(self, out: TextIO, clock: Callable[[], float]) -> None:
        self._out = out
        self._clock = clock
        self._tty = out.isatty()
        self._width = 0  # of the bar written last, still open at the terminal
        self._last = ""
        self._last_at = 0.0

    def show(self, status: DrainProgress, most_sets: int, elapsed_s: float) -> None:
        if self._tty:
            text = progress_bar(status, most_sets, elapsed_s)
            self._out.write("\r" + text.ljust(self._width))
            self._out.flush()
            self._width = len(text)
            return
        line = describe(status)
        if line != self._last or self._clock() - self._last_at >= LINE_EVERY_S:
            print(f"{line} ({elapsed_s:.0f} s)", file=self._out, flush=True)
            self._last, self._last_at = line, self._clock()

    def end(self) -> None:
        """Ends the bar left open at a terminal."""
        if self._width:
            self._out.write("\n")
            self._out.flush()
            self._width = 0


def cmd_drain(args: argparse.Namespace) -> int:
    credentials = channel_credentials(client_tls(args))
    channel = grpc.secure_channel(args.coordinator, credentials) if credentials else grpc.insecure_channel(args.coordinator)
    metadata = token_metadata(client_token(args))
    where = f"coordinator at {args.coordinator}"
    with channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.DrainAgent(
                pb.DrainAgentRequest(node=args.node, undo=args.undo), metadata=metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            if exc.code() in REFUSED:
                return _refused(args, str(exc.details()))
            raise error_from_rpc(exc, where) from None
        status = drain_from_proto(reply.status)
        if args.undo or args.no_wait:
            return _started(args, status, bool(reply.unchanged))
        if not args.json:
            print(f"{args.node} was being drained already; watching it" if reply.unchanged else f"drain of {args.node} started")

        def fetch() -> DrainProgress:
            try:
                answer = stub.GetDrainStatus(pb.GetDrainStatusRequest(node=args.node), metadata=metadata, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, where) from None
            return drain_from_proto(answer.status)

        line = ProgressLine(sys.stdout, time.monotonic)
        show = (lambda status, most_sets, elapsed_s: None) if args.json else line.show
        started = time.monotonic()
        try:
            outcome = watch_drain(fetch, timeout_s=args.timeout_s, clock=time.monotonic, sleep=time.sleep, show=show)
        except KeyboardInterrupt:
            line.end()
            print(f"stopped watching; the drain of {args.node} goes on (`--undo` ends it)", file=sys.stderr)
            return 130
        line.end()
    if args.json:
        print(json.dumps(_as_json(args.node, outcome.result, outcome.message, outcome.status, time.monotonic() - started)))
    elif outcome.code == 0:
        print(outcome.message)
    else:
        print(f"memckpt drain: {outcome.message}", file=sys.stderr)
    return outcome.code


def _refused(args: argparse.Namespace, details: str) -> int:
    if args.json:
        print(json.dumps(_as_json(args.node, "refused", details, None, 0.0)))
    print(f"memckpt drain: refused: {details}", file=sys.stderr)
    return 2


def _started(args: argparse.Namespace, status: DrainProgress, unchanged: bool) -> int:
    if args.undo:
        result, message = "undone", f"drain of {args.node} undone: it holds fragments for others again"
    else:
        result = "started"
        message = f"{args.node} was being drained already" if unchanged else f"drain of {args.node} started"
        message += f"; {describe(status)}; follow it with `memckpt drain {args.node} --coordinator {args.coordinator}`"
    print(json.dumps(_as_json(args.node, result, message, status, 0.0)) if args.json else message)
    return 0


def _as_json(node: str, result: str, message: str, status: DrainProgress | None, elapsed_s: float) -> dict[str, Any]:
    return {
        "node": node,
        "result": result,
        "message": message,
        "elapsed_s": round(elapsed_s, 3),
        "status": asdict(status) if status is not None else None,
    }
