"""The coordinator as a real process: leases, failure detection, generations, plans, token."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest

from memckpt.agent.coordination import HeartbeatStream
from memckpt.local import CoordinatorProcess, wait_until
from memckpt.protos import coordinator_pb2 as pb
from memckpt.protos import coordinator_pb2_grpc as pb_grpc
from memckpt.security import TlsFiles, token_metadata
from tests.conftest import AgentFactory

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token"


@pytest.fixture(params=["--state-process", "--no-state-process"], ids=["state-process", "one-process"])
def coordinator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CoordinatorProcess]:
    """A coordinator with its tables in a state process of their own (the default), or in its one process."""
    process = CoordinatorProcess(
        workdir=tmp_path,
        extra_args=["--lease-s", "1.5", "--heartbeat-interval-s", "0.3", "--token", TOKEN, request.param],
    )
    process.start()
    yield process
    assert process.stop() == 0, f"see {process.log_path}"


def agent_args(node: str, domain: str, coordinator: CoordinatorProcess) -> tuple[str, ...]:
    """Flags of an agent that joins `coordinator` with its peer service on a free loopback port."""
    return (
        *("--node", node, "--coordinator", coordinator.address, "--domain", domain, "--token", TOKEN),
        *("--advertise", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"),
    )


def held(job: str, rank: int, step: int, indices: tuple[int, ...] = ()) -> pb.HeldSnapshot:
    return pb.HeldSnapshot(job=job, rank=rank, step=step, generation=1, fragment_indices=list(indices), k=2, m=1, size_bytes=64)


def test_a_silent_agent_is_declared_failed_and_the_plan_uses_fragments(coordinator: CoordinatorProcess) -> None:
    meta = token_metadata(TOKEN)
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        inventory = {
            "a": [held("j", 0, 5)],
            "b": [held("j", 1, 5), held("j", 0, 5, (0,))],
            "c": [held("j", 1, 5, (0,)), held("j", 0, 5, (1,))],
            "d": [held("j", 1, 5, (1,)), held("j", 0, 5, (2,))],
            "e": [held("j", 1, 5, (2,))],
        }
        incarnations = {}
        for i, (node, entries) in enumerate(inventory.items()):
            agent = pb.AgentDescription(node=node, address=f"127.0.0.1:{9000 + i}", capacity_bytes=1 << 30, domain=f"rack{i}")
            incarnations[node] = stub.RegisterAgent(
                pb.RegisterAgentRequest(agent=agent, held=entries), metadata=meta, timeout=10
            ).incarnation

        def beat(nodes: list[str]) -> bool:
            for node in nodes:
                reply = stub.Heartbeat(
                    pb.HeartbeatRequest(node=node, incarnation=incarnations[node], held=inventory[node]),
                    metadata=meta,
                    timeout=10,
                )
                assert reply.accepted and len(reply.group) >= 4
            status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=meta, timeout=10)
            return [a.agent.node for a in status.agents if not a.alive] == ["b"]

        wait_until(lambda: beat(["a", "c", "d", "e"]), 15, "the coordinator to declare node b failed", interval_s=0.3)
        generation = stub.StartGeneration(
            pb.StartGenerationRequest(job="j", world_size=2, previous_generation=1), metadata=meta, timeout=10
        ).generation
        plan = stub.GetRecoveryPlan(pb.GetRecoveryPlanRequest(job="j", generation=generation), metadata=meta, timeout=10)
        assert plan.has_plan and plan.step == 5
        assert [c.node for c in plan.sources[0].copies] == ["a"]
        assert not plan.sources[1].copies and {f.node for f in plan.sources[1].fragments} == {"c", "d", "e"}
        with pytest.raises(grpc.RpcError) as info:
            stub.GetRecoveryPlan(pb.GetRecoveryPlanRequest(job="j", generation=generation - 1), metadata=meta, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stale = stub.Heartbeat(pb.HeartbeatRequest(node="b", incarnation=incarnations["b"]), metadata=meta, timeout=10)
        assert not stale.accepted, "a failed agent must register again"


def test_calls_without_the_token_are_unauthenticated(coordinator: CoordinatorProcess) -> None:
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        for metadata in ((), token_metadata("wrong")):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_registrations_get_invalid_argument(coordinator: CoordinatorProcess) -> None:
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        for agent in (pb.AgentDescription(node="../x", address="h:1"), pb.AgentDescription(node="ok", address="nohost")):
            with pytest.raises(grpc.RpcError) as info:
                stub.RegisterAgent(pb.RegisterAgentRequest(agent=agent), metadata=token_metadata(TOKEN), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_heartbeat_streams_renew_leases_carry_inventories_and_outlive_a_refusal(coordinator: CoordinatorProcess) -> None:
    meta = token_metadata(TOKEN)
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        incarnations = {}
        for i, node in enumerate("abcde"):
            agent = pb.AgentDescription(node=node, address=f"127.0.0.1:{9100 + i}", capacity_bytes=1 << 30, domain=f"rack{i}")
            incarnations[node] = stub.RegisterAgent(pb.RegisterAgentRequest(agent=agent), metadata=meta, timeout=10).incarnation
        streams = {node: HeartbeatStream(stub, meta) for node in "abcd"}

        def request(node: str, incarnation: int = 0) -> pb.HeartbeatRequest:
            rank = ord(node) - ord("a")
            return pb.HeartbeatRequest(node=node, incarnation=incarnation or incarnations[node], held=[held("j", rank, 6)])

        def status() -> pb.GetClusterStatusResponse:
            reply: pb.GetClusterStatusResponse = stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=meta, timeout=10)
            return reply

        def beat() -> bool:
            for node, stream in streams.items():
                reply = stream.send(request(node), 10)
                assert reply.accepted and len(reply.group) >= 4 and (reply.k, reply.m) == (2, 1)
            return [a.agent.node for a in status().agents if not a.alive] == ["e"]

        try:
            wait_until(beat, 15, "the coordinator to declare node e failed", interval_s=0.3)
            (job,) = status().jobs
            assert [(r.rank, r.committed_step) for r in job.ranks] == [(0, 6), (1, 6), (2, 6), (3, 6)], (
                "reported over the streams"
            )
            assert not streams["a"].send(request("a", incarnation=999), 10).accepted, "a stale incarnation"
            assert streams["a"].send(request("a"), 10).accepted, "the stream outlives a refusal"
            with pytest.raises(grpc.RpcError) as info:
                streams["a"].send(pb.HeartbeatRequest(node="../x"), 10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "a bad request ends the stream with its status"
            assert streams["a"].send(request("a"), 10).accepted, "on a new stream"
            with pytest.raises(grpc.RpcError) as info:
                HeartbeatStream(stub, token_metadata("wrong")).send(request("a"), 10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for stream in streams.values():
                stream.close()


def test_the_state_process_lives_and_dies_with_the_coordinator(tmp_path: Path) -> None:
    """The tables live in a child process: a heartbeat is answered without it, a bad one is
    refused before it; the coordinator stops (exit 1, said in its log) when its state process
    dies, and the state process ends when the coordinator is killed."""
    coordinator = CoordinatorProcess(workdir=tmp_path, extra_args=["--lease-s", "1.5", "--heartbeat-interval-s", "0.3"])
    coordinator.start()
    try:
        (state,) = psutil.Process(coordinator.pid).children()
        assert "memckpt.coordinator.state" in state.cmdline()
        assert state.nice() > psutil.Process(coordinator.pid).nice(), "heartbeats come first on a shared core"
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = pb_grpc.CoordinatorServiceStub(channel)
            agent = pb.AgentDescription(node="a", address="127.0.0.1:9100", capacity_bytes=1 << 30, domain="rack0")
            incarnation = stub.RegisterAgent(pb.RegisterAgentRequest(agent=agent), timeout=10).incarnation
            reply = stub.Heartbeat(pb.HeartbeatRequest(node="a", incarnation=incarnation, held=[held("j", 0, 3)]), timeout=10)
            assert reply.accepted, "a heartbeat right after its registration"
            assert not stub.Heartbeat(pb.HeartbeatRequest(node="a", incarnation=incarnation + 1), timeout=10).accepted
            raw = channel.unary_unary("/memckpt.v1.CoordinatorService/Heartbeat")
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "a malformed heartbeat"

            def committed() -> list[int]:
                status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
                return [r.committed_step for job in status.jobs for r in job.ranks]

            wait_until(lambda: committed() == [3], 10, "the report to reach the state process")
        state.kill()
        assert coordinator.process is not None
        assert coordinator.process.wait(timeout=30) == 1
        assert f"the state process (pid {state.pid}) ended" in coordinator.log_path.read_text()

        coordinator.start()
        (state,) = psutil.Process(coordinator.pid).children()
        coordinator.kill()
        gone, _ = psutil.wait_procs([state], timeout=30)
        assert gone, "the state process outlived the coordinator"
    finally:
        coordinator.kill()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="a PID namespace needs root and unshare")
def test_the_coordinator_runs_as_process_1_of_a_container(tmp_path: Path) -> None:
    """As in the shipped Kubernetes manifest (no init): the state process's parent is process 1."""
    port_file = tmp_path / "port"
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "memckpt.coordinator"]
    with open(tmp_path / "coordinator.log", "wb") as log:
        process = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", 60, "the coordinator's port")
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            status = pb_grpc.CoordinatorServiceStub(channel).GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        assert list(status.agents) == []
        assert process.poll() is None
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # process 1 of the namespace goes: the kernel ends the rest
        process.wait()


def test_agents_heartbeat_with_one_call_each_when_the_coordinator_has_no_streams() -> None:
    """An older coordinator (here a bare server that knows only Heartbeat) answers UNIMPLEMENTED."""
    calls = []

    def heartbeat(request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        calls.append(request.node)
        return pb.HeartbeatResponse(accepted=True)

    handler = grpc.unary_unary_rpc_method_handler(
        heartbeat, request_deserializer=pb.HeartbeatRequest.FromString, response_serializer=pb.HeartbeatResponse.SerializeToString
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("memckpt.v1.CoordinatorService", {"Heartbeat": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = HeartbeatStream(pb_grpc.CoordinatorServiceStub(channel), ())
            assert stream.send(pb.HeartbeatRequest(node="a", incarnation=1), 10).accepted
            assert stream.send(pb.HeartbeatRequest(node="a", incarnation=1), 10).accepted
            stream.close()
        assert calls == ["a", "a"]
    finally:
        server.stop(None)


def test_real_agents_register_heartbeat_and_a_killed_one_is_declared_failed(
    tmp_path: Path, coordinator: CoordinatorProcess, agent_factory
) -> None:  # noqa: ANN001
    agents = [agent_factory(name=f"node{i}", extra_args=agent_args(f"node{i}", f"rack{i}", coordinator)) for i in range(5)]
    meta = token_metadata(TOKEN)
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)

        def alive() -> list[str]:
            status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), metadata=meta, timeout=10)
            return sorted(a.agent.node for a in status.agents if a.alive)

        wait_until(lambda: alive() == [f"node{i}" for i in range(5)], 30, "all five agents to register")
        agents[2].kill()
        wait_until(lambda: "node2" not in alive(), 30, "node2 to be declared failed")
        assert alive() == ["node0", "node1", "node3", "node4"]


def test_memckpt_status_shows_the_cluster(coordinator: CoordinatorProcess, agent_factory) -> None:  # noqa: ANN001
    import json
    import subprocess
    import sys

    from memckpt.trainer import Checkpointer

    from .helpers import make_state

    agents = [agent_factory(name=f"n{i}", extra_args=agent_args(f"n{i}", f"rack{i}", coordinator)) for i in range(4)]
    with Checkpointer("cj", rank=0, world_size=1, socket_path=agents[0].socket_path, strict=True) as ck:
        ck.snapshot(3, make_state(3))
        ck.wait()
    command = [sys.executable, "-m", "memckpt.cli", "status", "--coordinator", coordinator.address, "--token", TOKEN, "--json"]

    def status() -> dict:
        return json.loads(subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout)

    def protected() -> bool:  # four agents with k=2, m=1 make a group: the commit gets protected
        return any(j["job"] == "cj" and j["ranks"][0]["protected_step"] == 3 for j in status()["jobs"])

    wait_until(protected, 30, "the job's step to reach the coordinator, protected")
    report = status()
    assert sorted(a["node"] for a in report["agents"] if a["alive"]) == ["n0", "n1", "n2", "n3"]
    assert all(a["group"] == 0 for a in report["agents"]), "four agents with k=2, m=1 make one group"
    (job,) = [j for j in report["jobs"] if j["job"] == "cj"]
    assert job["ranks"] == [{"rank": 0, "committed_step": 3, "protected_step": 3}]
    n0 = next(a for a in report["agents"] if a["node"] == "n0")
    assert n0["memory_used_bytes"] > 0 and n0["memory_budget_bytes"] == 1 << 30
    table = subprocess.run(command[:-1], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "n3" in table and "cj" in table


def test_a_fresh_coordinator_answers_locations_and_plans_only_after_a_lease(tmp_path: Path) -> None:
    """Its tables are soft: until every live agent can have registered again (one lease), an
    empty answer would read as "nothing held" and start a replacement rank fresh."""
    process = CoordinatorProcess(workdir=tmp_path, extra_args=["--lease-s", "3", "--heartbeat-interval-s", "0.5"])
    process.start()
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.CoordinatorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.LocateSnapshots(pb.LocateSnapshotsRequest(job="j", rank=0), timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "learns what agents hold" in str(refused.value.details())
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetRecoveryPlan(pb.GetRecoveryPlanRequest(job="j", generation=1), timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

            def answers() -> bool:
                try:
                    stub.LocateSnapshots(pb.LocateSnapshotsRequest(job="j", rank=0), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                    return False
                return True

            wait_until(answers, 15, "the coordinator to answer after its lease", interval_s=0.2)
    finally:
        assert process.stop() == 0, f"see {process.log_path}"


def test_mutual_tls_an_agent_joins_and_the_cli_needs_a_certificate(
    tmp_path: Path, tls_files: TlsFiles, agent_factory: AgentFactory
) -> None:
    """Coordinator and agent with mutual TLS and the token: the agent registers over TLS, and
    `memckpt status --coordinator` works with the CA and a client certificate, not without."""
    tls_flags = ("--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), "--tls-ca", str(tls_files.ca))
    process = CoordinatorProcess(
        workdir=tmp_path, extra_args=["--lease-s", "2", "--heartbeat-interval-s", "0.3", "--token", TOKEN, *tls_flags]
    )
    process.start()
    try:
        agent_factory(extra_args=(*agent_args("tls-node", "rack0", process), *tls_flags))

        def status(*flags: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "memckpt.cli", "status", "--coordinator", process.address, "--json", *flags]
            return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "MEMCKPT_TOKEN": TOKEN})

        def joined() -> bool:
            done = status(*tls_flags)
            assert done.returncode == 0, done.stderr
            return [a["node"] for a in json.loads(done.stdout)["agents"] if a["alive"]] == ["tls-node"]

        wait_until(joined, 30, "the agent to register over mutual TLS")
        without_certificate = status("--tls-ca", str(tls_files.ca))
        assert without_certificate.returncode != 0, "the coordinator asks for a client certificate"
        plaintext = status()
        assert plaintext.returncode != 0, "no plaintext calls to a TLS coordinator"
        assert "coordinator at" in plaintext.stderr, plaintext.stderr
        for refused in (without_certificate, plaintext):
            assert "Traceback" not in refused.stderr, refused.stderr  # a precise error, not a crash
    finally:
        assert process.stop() == 0, f"see {process.log_path}"


def test_a_token_file_keeps_the_token_out_of_every_process_list(tmp_path: Path, agent_factory: AgentFactory) -> None:
    """--token-file on the coordinator, an agent and the CLI: they all authenticate, and the
    token appears on no command line; a file with another token is refused."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    coordinator = CoordinatorProcess(
        workdir=tmp_path, extra_args=["--lease-s", "1.5", "--heartbeat-interval-s", "0.3", "--token-file", str(token_file)]
    )
    coordinator.start()
    try:
        args = [a for a in agent_args("t0", "rack0", coordinator) if a not in ("--token", TOKEN)]
        agent = agent_factory(name="t0", extra_args=(*args, "--token-file", str(token_file)))
        command = [sys.executable, "-m", "memckpt.cli", "status", "--coordinator", coordinator.address, "--json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCKPT_TOKEN")}

        def nodes() -> list[str]:
            run = subprocess.run([*command, "--token-file", str(token_file)], capture_output=True, text=True, timeout=30, env=env)
            assert run.returncode == 0, run.stderr
            return [a["node"] for a in json.loads(run.stdout)["agents"] if a["alive"]]

        wait_until(lambda: nodes() == ["t0"], 30, "the agent to register with the token from its file")
        for process in (coordinator.process, agent.process):
            assert process is not None
            assert TOKEN not in Path(f"/proc/{process.pid}/cmdline").read_text()
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token\n")
        wrong.chmod(0o600)
        run = subprocess.run([*command, "--token-file", str(wrong)], capture_output=True, text=True, timeout=30, env=env)
        assert run.returncode != 0 and "missing or wrong token" in run.stderr
    finally:
        assert coordinator.stop() == 0, f"see {coordinator.log_path}"
