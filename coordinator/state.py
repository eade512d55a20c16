"""The coordinator in two processes: a front end that answers heartbeats, and a state process.

At 2,000 agents heartbeating every second, gRPC alone takes most of a core in Python, and the
bookkeeping behind the heartbeats (filing each node's inventory, recomputing what every job
protects, plans) added a third again on the same event loop: heartbeats queued behind it, and
their tail latency grew to hundreds of milliseconds (bench/coordinator_scale.py). So the daemon
(`daemon.py`) runs two processes unless told otherwise (`state_process`):

- The front end (`Frontend`, in the daemon's process) serves gRPC. A heartbeat is answered from
  a view the state process sends (node -> its incarnation and its group's encoded reply); the
  front end parses only the request's header (`HeartbeatHeader`) and passes the request on
  unparsed, in batches (`BEATS_EVERY_S`), with the time it came. Every other call is passed on as it came, and
  its reply or error returned as the state process gave it.
- The state process (`serve_state`, the daemon's child) holds the `CoordinatorServicer` and its
  `Cluster`: it renews leases by each heartbeat's arrival time, files the reports, refreshes
  protection, expires leases, computes plans and serves the Prometheus endpoint. It runs at a
  lower CPU priority (`STATE_NICE`): where the two share a busy core, heartbeats come first.
  Whenever what a heartbeat is answered changes (registrations, failures, groups, drains,
  targets), it sends the new view within `VIEW_EVERY_S`; a registered node's incarnation
  (`Admit`) comes before its registration's reply (a view of 2,000 nodes takes milliseconds
  to build, and groups are rebuilt after every join: not once per registration).

They talk over a private socket pair: length-prefixed pickles (one process is the other's
child; nothing else can reach the socket). Each ends with the other: the state process exits
when the socket closes or its parent dies; the front end stops serving when the state process
is gone, and the supervisor starts the coordinator again, whose state is soft.

A heartbeat answered from a view up to `VIEW_EVERY_S` old can be told "accepted" by a front end
that has not yet heard that the node's lease ran out (its next heartbeat is refused, and the
state process drops the report of a failed member as before), or carry its group of a moment
ago (heartbeats in one process saw it a heartbeat interval late anyway).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc

from memckpt.coordinator import metrics
from memckpt.coordinator.cluster import Cluster
from memckpt.coordinator.config import CoordinatorConfig
from memckpt.coordinator.service import STATE_WORK_SHARE, CoordinatorServicer, map_errors, map_stream_errors
from memckpt.errors import InvalidRequest, Unavailable
from memckpt.metrics import MetricsServer, serve_daemon
from memckpt.names import check_name
from memckpt.process import LOG_FORMAT
from memckpt.protos import coordinator_pb2 as pb

log = logging.getLogger(__name__)
# The tables of thousands of agents are millions of long-lived objects: with Python's default
# thresholds the cyclic collector walks them several times a second and every call waits for
# it (bench/coordinator_scale.py, 2,000 agents: heartbeat p99 267 ms with the defaults, 114 ms
# with these). Little the coordinator allocates is cyclic; reference counting frees the rest.
GC_THRESHOLDS = (50_000, 20, 100)
STATE_NICE = 10  # the state process's niceness above the front end's: a tenth of a core they share
# The state process's refreshes (filing reports, recomputing protection) take at most this share
# of a core on average: at 2,000 busy agents a refresh takes 0.2-0.9 s of CPU on a slow 2-core
# VM, refreshed then every 2-9 s, and the heartbeats' front end keeps the CPU it needs. A small
# cluster refreshes every tick (its refresh takes milliseconds). Plans and locations file what
# is pending first, whatever this pace.
STATE_CPU_SHARE = 0.1
# While a refresh runs it takes at most this share of the state process's event loop: the rest
# goes to the heartbeats' renewals and to calls (plans, locations) passed on by the front end.
# Low, so that a refresh (a second of CPU at 2,000 busy agents here) is spread thin: at 0.5 the
# slow heartbeats on a 2-core VM came in bursts at each refresh (coordinator_scale, warm-up
# 15 s: p99 126 ms at 0.5, 95 ms at 0.2).
STATE_PROCESS_WORK_SHARE = 0.2
START_TIMEOUT_S = 60.0  # for the state process's first view
STOP_TIMEOUT_S = 5.0  # for the state process to exit once its socket closed
VIEW_EVERY_S = 0.1  # the state process sends a whole view at most this often
# Heartbeats are passed on in batches at most this old: one message per heartbeat cost both
# processes a system call and a wake-up each (2,000 a second at 2,000 agents).
BEATS_EVERY_S = 0.02
UNVIEWED = -1  # the reply index of a node admitted since the last view
CLOCK_S = 0.25  # the front end sends a batch of heartbeats at least this often, an empty one if need be
# The state process reads heartbeats this late at most before it stops expiring leases (after a
# stall of its own, the renewals it has not read yet would otherwise fail live agents).
READ_LAG_S = 2.0
STATE_SILENT_S = 30.0  # a state process silent this long is stalled: the coordinator stops
FRAME = struct.Struct("!Q")
SERVICE = pb.DESCRIPTOR.services_by_name["CoordinatorService"]
HEARTBEAT_METHODS = frozenset({"Heartbeat", "StreamHeartbeats"})
# the methods the front end passes on, and the message each takes
REQUEST_TYPES: dict[str, Any] = {
    method.name: getattr(pb, method.input_type.name) for method in SERVICE.methods if method.name not in HEARTBEAT_METHODS
}
PR_SET_PDEATHSIG = 1


# --- what the two processes tell each other ---------------------------------------------------


class Beats(NamedTuple):
    """Heartbeats the front end accepted: (node, incarnation, the request as it came, when it
    came (monotonic)), the newest of each node; the seconds each took the front end (for the
    latency metric); when this was sent (sent at least every `CLOCK_S`, empty if need be: the
    state process expires no lease while it reads them late)."""

    reports: list[tuple[str, int, bytes, float]]
    seconds: list[float]
    sent_at: float


class Alive(NamedTuple):
    """The state process's tick: a front end that hears nothing for `STATE_SILENT_S` stops."""


class Call(NamedTuple):
    id: int
    method: str
    request: bytes


class Reply(NamedTuple):
    id: int
    response: bytes


class Failure(NamedTuple):
    id: int
    code: str  # a grpc.StatusCode's name
    details: str


class View(NamedTuple):
    """How heartbeats are answered: node -> (its incarnation, the index of its reply in
    `replies`); a node not named, or of another incarnation, must register again."""

    nodes: dict[str, tuple[int, int]]
    replies: list[bytes]


class Admit(NamedTuple):
    """A node that registered, sent before its registration's reply: its heartbeats are
    accepted from now on, answered as its last view said, or (a node new to the view) once the
    next view, due within `VIEW_EVERY_S`, gives its group."""

    node: str
    incarnation: int


def send(writer: asyncio.StreamWriter, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.writelines((FRAME.pack(len(data)), data))


async def receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None when the other process closed its end."""
    try:
        (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


# --- the front end: the daemon's process -------------------------------------------------------


class Frontend:
    """Serves the CoordinatorService: heartbeats from the state process's view, every other
    call passed on to it (`Frontend.start` spawns it)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        process: subprocess.Popen[bytes],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.process = process
        self._nodes: dict[str, tuple[int, int]] = {}
        self._replies: list[bytes] = []
        self._rejected = pb.HeartbeatResponse(accepted=False, k=config.k, m=config.m).SerializeToString()
        # node -> (incarnation, report, when it came) of its newest heartbeat since the last batch
        self._reports: dict[str, tuple[int, bytes, float]] = {}
        self._seconds: list[float] = []
        self._sent_at = time.monotonic()  # when the last batch went
        self.heard_at = time.monotonic()  # when the state process last said something
        self._calls: dict[int, asyncio.Future[Reply | Failure]] = {}
        self._ids = itertools.count()
        self._viewed = asyncio.Event()
        self._new_view = asyncio.Event()  # set (and replaced) when a view comes
        self.ended = asyncio.Event()  # the state process is gone
        self._reading = asyncio.create_task(self._read())
        self._clock = asyncio.create_task(self._keep_time())

    @classmethod
    async def start(cls, config: CoordinatorConfig) -> Frontend:
        """Starts the state process and waits for its first view. Raises Unavailable if it
        does not come up."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "memckpt.coordinator.state", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.PIPE,
            )
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(pickle.dumps(config))
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        frontend = cls(config, reader, writer, process)
        waiting = asyncio.create_task(frontend._viewed.wait())
        ended = asyncio.create_task(frontend.ended.wait())
        await asyncio.wait([waiting, ended], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        ended.cancel()
        if not frontend._viewed.is_set():
            await frontend.close()
            raise Unavailable(f"the coordinator's state process (pid {process.pid}) did not start (exit {process.returncode})")
        log.info("state process pid=%d", process.pid)
        return frontend

    def add_to(self, server: grpc.aio.Server) -> None:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(self._passer(name)) for name in REQUEST_TYPES
        }
        handlers["Heartbeat"] = grpc.unary_unary_rpc_method_handler(self._heartbeat)
        handlers["StreamHeartbeats"] = grpc.stream_stream_rpc_method_handler(self._stream_heartbeats)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))

    async def close(self) -> None:
        """Closes the socket (the state process exits on it) and waits for the process."""
        self._writer.close()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the state process (pid %d) did not exit in %.0f s: killed", self.process.pid, STOP_TIMEOUT_S)
            self.process.kill()
            await loop.run_in_executor(None, self.process.wait)
        self._reading.cancel()
        self._clock.cancel()

    async def _read(self) -> None:
        try:
            while (message := await receive(self._reader)) is not None:
                self.heard_at = time.monotonic()
                if isinstance(message, Alive):
                    continue
                if isinstance(message, View):
                    self._nodes, self._replies = message.nodes, message.replies
                    self._viewed.set()
                    self._new_view.set()
                    self._new_view = asyncio.Event()
                elif isinstance(message, Admit):
                    known = self._nodes.get(message.node)
                    self._nodes[message.node] = (message.incarnation, known[1] if known is not None else UNVIEWED)
                elif (future := self._calls.pop(message.id, None)) is not None and not future.done():
                    future.set_result(message)
        except ConnectionError as exc:  # it died with bytes unread
            log.warning("the state process's socket: %s", exc)
        except Exception:
            log.exception("reading from the state process failed")
            raise
        finally:
            self.ended.set()
            self._new_view.set()
            for id_, future in self._calls.items():
                if not future.done():
                    future.set_result(Failure(id_, "UNAVAILABLE", "the coordinator's state process stopped; ask again"))

    async def _answer(self, request: bytes) -> bytes:
        started = time.perf_counter()
        try:
            header = pb.HeartbeatHeader.FromString(request)
        except Exception as exc:  # protobuf's DecodeError
            raise InvalidRequest(f"malformed heartbeat: {exc}") from exc
        check_name(header.node, "node")
        known = self._nodes.get(header.node)
        while known == (header.incarnation, UNVIEWED) and not self.ended.is_set():  # its group comes with the next view
            await self._new_view.wait()
            known = self._nodes.get(header.node)
        if self.ended.is_set():
            raise Unavailable("the coordinator is stopping")
        if known is None or known[0] != header.incarnation:
            return self._rejected
        if not self._seconds:
            asyncio.get_running_loop().call_later(BEATS_EVERY_S, self._send_beats)
        self._reports[header.node] = (header.incarnation, request, time.monotonic())
        self._seconds.append(time.perf_counter() - started)
        return self._replies[known[1]]

    def _send_beats(self) -> None:
        reports = [(node, incarnation, report, at) for node, (incarnation, report, at) in self._reports.items()]
        seconds, self._reports, self._seconds = self._seconds, {}, []
        self._sent_at = time.monotonic()
        if not self._writer.is_closing():
            send(self._writer, Beats(reports, seconds, self._sent_at))

    async def _keep_time(self) -> None:
        """An empty batch when no heartbeat came for `CLOCK_S`: the state process's clock."""
        while True:
            await asyncio.sleep(CLOCK_S)
            if time.monotonic() - self._sent_at >= CLOCK_S and not self._seconds:
                self._send_beats()

    def silent_s(self) -> float:
        """How long the state process has said nothing (it ticks every second or less)."""
        return time.monotonic() - self.heard_at

    @map_errors
    async def _heartbeat(self, request: bytes, context: Any) -> bytes:
        return await self._answer(request)

    @map_stream_errors
    async def _stream_heartbeats(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield await self._answer(request)

    def _passer(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]:
        async def pass_on(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            if self.ended.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is stopping")
            id_ = next(self._ids)
            future = self._calls[id_] = asyncio.get_running_loop().create_future()
            send(self._writer, Call(id_, method, request))
            try:
                answer = await future
            finally:
                self._calls.pop(id_, None)
            if isinstance(answer, Failure):
                await context.abort(grpc.StatusCode[answer.code], answer.details)
            assert isinstance(answer, Reply)
            return answer.response

        return pass_on


# --- the state process --------------------------------------------------------------------------


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallContext:
    """What the servicer's methods use of a gRPC context, for a call passed on by the front end."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


class StateLink:
    """The state process's end: files what the front end passes on, answers its calls, and
    sends it a new view whenever the answer to a heartbeat changes."""

    def __init__(self, servicer: CoordinatorServicer, writer: asyncio.StreamWriter) -> None:
        self._servicer = servicer
        self._writer = writer
        self._version: tuple[object, ...] | None = None
        self._sent_at = -math.inf  # when the last view was sent (monotonic)
        self._later: asyncio.TimerHandle | None = None  # a view due later
        self._calls: set[asyncio.Task[None]] = set()
        self._encoded: dict[str, tuple[object, bytes]] = {}  # method -> its last response and its encoding
        self.heard_at = time.monotonic()  # when the front end sent the newest batch of heartbeats read

    def send_view_if_changed(self) -> None:
        """Sends a new view if the answers changed, at most once every `VIEW_EVERY_S` (a view
        of 2,000 nodes takes milliseconds to build, and they register a few hundred a second)."""
        if self._later is not None:
            return  # sent when it is due
        wait_s = self._sent_at + VIEW_EVERY_S - time.monotonic()
        if wait_s > 0:
            self._later = asyncio.get_running_loop().call_later(wait_s, self._send_view_when_due)
            return
        version = self._servicer.view_version()
        if version == self._version:
            return
        nodes, replies = self._servicer.heartbeat_view()
        send(self._writer, View(nodes, replies))
        self._version = version
        self._sent_at = time.monotonic()

    def _send_view_when_due(self) -> None:
        self._later = None
        self.send_view_if_changed()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Until the front end closes its end."""
        while (message := await receive(reader)) is not None:
            if isinstance(message, Beats):
                self.heard_at = message.sent_at
                for node, incarnation, request, at in message.reports:
                    self._servicer.accept_report(node, incarnation, request, at)
                metrics.HEARTBEATS.inc(len(message.seconds))
                for seconds in message.seconds:
                    metrics.HEARTBEAT_SECONDS.observe(seconds)
                self.send_view_if_changed()
            else:
                task = asyncio.create_task(self._call(message))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)

    def reading_on_time(self) -> bool:
        """Whether the heartbeats read are at most `READ_LAG_S` old: leases may expire."""
        return time.monotonic() - self.heard_at <= READ_LAG_S

    def tick(self) -> None:
        """After each lease check: a new view if need be, and a sign of life."""
        self.send_view_if_changed()
        send(self._writer, Alive())

    def _encode(self, method: str, response: Any) -> bytes:
        """The response's encoding; the same reply object again (a pinned plan, asked by every
        rank of a restarted job: megabytes at 16,000 ranks) is encoded once."""
        cached = self._encoded.get(method)
        if cached is not None and cached[0] is response:
            return cached[1]
        encoded: bytes = response.SerializeToString()
        self._encoded[method] = (response, encoded)
        return encoded

    async def _call(self, call: Call) -> None:
        answer: Reply | Failure
        try:
            request = REQUEST_TYPES[call.method].FromString(call.request)
        except Exception as exc:  # protobuf's DecodeError
            answer = Failure(call.id, "INVALID_ARGUMENT", f"malformed {call.method} request: {exc}")
        else:
            try:
                response = await getattr(self._servicer, call.method)(request, _CallContext())
                answer = Reply(call.id, self._encode(call.method, response))
            except _Aborted as exc:  # map_errors logged it
                answer = Failure(call.id, exc.code.name, exc.details)
            except Exception as exc:  # never leave the caller without an answer
                log.exception("rpc=%s failed", call.method)
                answer = Failure(call.id, "INTERNAL", f"{type(exc).__name__}: {exc}")
            else:
                if call.method == "RegisterAgent":  # its heartbeats are accepted from its reply on
                    send(self._writer, Admit(request.agent.node, response.incarnation))
        self.send_view_if_changed()
        send(self._writer, answer)


async def serve_state(config: CoordinatorConfig, sock: socket.socket) -> int:
    """The state process: until the front end closes the socket."""
    servicer = CoordinatorServicer(Cluster(k=config.k, m=config.m, lease_s=config.lease_s), config.heartbeat_interval_s)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    link = StateLink(servicer, writer)
    serving = threading.Event()
    serving.set()
    metrics_server = start_metrics(config, servicer, serving)
    quiet_collector()
    link.send_view_if_changed()
    tick_s = tick_interval(config)
    stop = threading.Event()
    tasks = [
        asyncio.create_task(expire_leases(servicer, tick_s, then=link.tick, ready=link.reading_on_time), name="expire_leases"),
        asyncio.create_task(
            refresh_forever(
                servicer,
                tick_s,
                stop,
                then=link.send_view_if_changed,
                work_share=STATE_PROCESS_WORK_SHARE,
                cpu_share=STATE_CPU_SHARE,
            ),
            name="refresh_forever",
        ),
    ]
    serving_link = asyncio.create_task(link.serve(reader), name="serve")
    try:
        done, _ = await asyncio.wait([serving_link, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        serving.clear()
        for task in (serving_link, *tasks):
            task.cancel()
        if metrics_server is not None:
            metrics_server.stop()
    failed = [task for task in done if task is not serving_link or task.exception() is not None]
    for task in failed:  # a bug: stop, and the coordinator is started again whole
        log.error("state process stopping: %s ended", task.get_name(), exc_info=task.exception())
    if not failed:
        log.info("state process stopping: the front end closed its end")
    return 1 if failed else 0


def _die_with_parent(parent: int) -> bool:
    """SIGKILL this process when the daemon's process `parent` dies (Linux), even if the socket
    lingers; False when it is gone already."""
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            log.warning(
                "no death signal (prctl: %s): the state process ends when its socket closes", os.strerror(ctypes.get_errno())
            )
    except (OSError, AttributeError):  # not Linux: the socket's end still ends it
        pass
    return os.getppid() == parent  # not `!= 1`: in a container the daemon may be process 1


def main(argv: list[str] | None = None) -> int:
    """`python -m memckpt.coordinator.state FD DAEMON_PID`, the config pickled on stdin (`Frontend.start`)."""
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C and a supervisor's SIGTERM reach the process group: the front end stops serving
    # (it still passes calls on in its grace period), then closes the socket, which ends this
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    config: CoordinatorConfig = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
    if not _die_with_parent(int(args[1])):
        log.error("the coordinator (pid %s) that started this state process is gone", args[1])
        return 1
    os.nice(STATE_NICE)
    return asyncio.run(serve_state(config, socket.socket(fileno=int(args[0]))))


def quiet_collector() -> None:
    """Python's cyclic collector set for a long-lived process with large tables: what exists
    now (start-up's objects) is never walked again, and collections are rare (`GC_THRESHOLDS`)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# --- the state's cadence (in the state process, or in the daemon's with state_process off) ------


def tick_interval(config: CoordinatorConfig) -> float:
    """How often leases are checked and protection targets refreshed."""
    return min(1.0, config.lease_s / 4, config.heartbeat_interval_s)


async def refresh_forever(
    servicer: CoordinatorServicer,
    tick_s: float,
    stop: threading.Event,
    then: Callable[[], None] = lambda: None,
    *,
    work_share: float = STATE_WORK_SHARE,
    cpu_share: float | None = None,
) -> None:
    """Refreshes what the agents reported every `tick_s` until `stop` is set, calling `then`
    after each: a refresh takes at most `work_share` of the event loop's time while it runs,
    and refreshes (with `cpu_share`) at most that share of a core on average, however many
    agents report; at once after one that took longer. Logs when refreshes fall behind the
    tick and when they catch up."""
    loop = asyncio.get_running_loop()
    began, every_s, behind = time.monotonic(), tick_s, False
    while not await loop.run_in_executor(None, stop.wait, max(0.0, began + every_s - time.monotonic())):
        began = time.monotonic()
        worked = await servicer.refresh_async(work_share)
        then()
        took = time.monotonic() - began
        every_s = max(tick_s, worked / cpu_share) if cpu_share else tick_s
        metrics.REFRESH_SECONDS.observe(took)
        late = max(took, every_s)
        if (late > 2 * tick_s) != behind:  # logged when it starts and when it ends, not every time
            behind = not behind
            if behind:
                share = f"{100 * cpu_share:.0f}% of a core" if cpu_share else f"{100 * work_share:.0f}% of the event loop"
                log.warning(
                    "inventories are filed every %.1f s (a refresh takes %.2f s of CPU, paced to at most %s): "
                    "protection targets and plans see reports up to that late",
                    late,
                    worked,
                    share,
                )
            else:
                log.info("inventories are filed every %.1f s again", tick_s)


async def expire_leases(
    servicer: CoordinatorServicer,
    every_s: float,
    then: Callable[[], None] = lambda: None,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Fails agents whose lease ran out, every `every_s`, however long a refresh takes, while
    `ready()` (the renewals are read in time); calls `then` after each."""
    late = False
    while True:
        await asyncio.sleep(every_s)
        try:
            if ready():
                servicer.expire_leases()
            elif not late:
                log.warning("leases are not expired: heartbeats are read late (the state process was stalled)")
            late = not ready()
            then()
        except Exception:  # a bug here must not end failure detection for good
            log.exception("lease expiry failed; trying again in %.1f s", every_s)


def start_metrics(config: CoordinatorConfig, servicer: CoordinatorServicer, serving: threading.Event) -> MetricsServer | None:
    """The Prometheus endpoint (`metrics_listen`, see `memckpt.metrics.serve_daemon`), healthy
    while `serving` is set; None when off."""
    if not config.metrics_listen:
        return None
    metrics.REGISTRY.register(metrics.StateCollector(servicer.metrics_view))
    server = serve_daemon(config.metrics_listen, metrics.REGISTRY, ready=serving.is_set, tls=config.tls)
    servicer.metrics_address = server.address
    return server


if __name__ == "__main__":
    from memckpt.coordinator import state  # messages must pickle as this module's, not as __main__'s

    sys.exit(state.main())
