"""Partition, not crash: a node cut off the network is failed when its lease runs out, the
cluster protects without it, and when its link is back its agent corrupts nothing.

Each node's agent runs in its own network namespace, joined by a veth pair to a bridge in the
root namespace, where the coordinator listens on the bridge's address. Cutting a node is
`ip link set <its veth> down`: its agent keeps running and serving its ranks, but no TCP
packet reaches it or leaves it (a black hole, not a refused connection as after a crash). The
test process talks to every agent over its unix socket and shared memory, which network
namespaces do not separate. Needs root and iproute2 (skipped otherwise).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from memckpt.agent.erasure import Scheme, decode
from memckpt.agent.peers import PeerClient
from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.coordinator.groups import choose_fragment_holders
from memckpt.local import AgentProcess, CoordinatorProcess, is_serving, wait_until
from memckpt.protos import agent_pb2 as apb
from memckpt.protos import coordinator_pb2 as cpb
from memckpt.protos import coordinator_pb2_grpc as cpb_grpc
from memckpt.security import TlsFiles, token_metadata
from memckpt.trainer import Checkpointer

from .helpers import agent_stub, assert_state_equal, empty_like_state, make_state

pytestmark = pytest.mark.integration
TOKEN = "partition-s3cret"
NODES = tuple(f"node{i}" for i in range(5))
LEASE_S = 2.0
HEARTBEAT_S = 0.2
REGISTERED = re.compile(r"registered with coordinator \S+ incarnation=(\d+)")


# -- the test bed: one network namespace per node --------------------------------------


class NetError(Exception):
    pass


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def subnet_users(subnet: str, besides: str) -> list[str]:
    """Addresses and routes of the root namespace in `subnet`.0/24 on another device than `besides`."""
    lines = (ip("-o", "addr", "show") + ip("route", "show")).splitlines()
    return [line for line in lines if f"{subnet}." in line and f" {besides} " not in f"{line} "]


@dataclass
class Net:
    """A bridge in the root namespace (the coordinator's side) and a namespace per node behind a veth."""

    tag: str  # in every name: namespaces and links of two concurrent runs never meet
    subnet: str
    namespaces: dict[str, str] = field(default_factory=dict)  # node -> namespace
    links: dict[str, str] = field(default_factory=dict)  # node -> its veth's end on the bridge
    down: set[str] = field(default_factory=set)  # nodes cut off now

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def address_of(self, node: str) -> str:
        return f"{self.subnet}.{10 + int(node.removeprefix('node'))}"

    def create(self) -> None:
        """The bridge, on a 10.213.x.0/24 (x from the pid) that nothing else on this machine uses."""
        ip("link", "add", self.bridge, "type", "bridge")
        try:  # bridged traffic skips the host's iptables (a FORWARD policy of DROP would eat it)
            ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0")
        except NetError:
            pass
        start = os.getpid() + secrets.randbelow(250)
        for i in range(250):
            self.subnet = f"10.213.{(start + i) % 250 + 2}"
            if subnet_users(self.subnet, self.bridge):
                continue
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            if not subnet_users(self.subnet, self.bridge):  # no concurrent run took it too meanwhile
                break
            ip("addr", "del", f"{self.gateway}/24", "dev", self.bridge)
        else:
            raise NetError("found no free 10.213.x.0/24")
        ip("link", "set", self.bridge, "up")

    def add_node(self, node: str) -> None:
        number = node.removeprefix("node")
        namespace, outer, inner = f"{self.tag}n{number}", f"{self.tag}h{number}", f"{self.tag}p{number}"
        ip("netns", "add", namespace)
        self.namespaces[node] = namespace
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", namespace)
        self.links[node] = outer
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "addr", "add", f"{self.address_of(node)}/24", "dev", inner)
        ip("-n", namespace, "link", "set", inner, "up")

    def cut(self, node: str) -> None:
        ip("link", "set", self.links[node], "down")
        self.down.add(node)

    def heal(self, node: str) -> None:
        ip("link", "set", self.links[node], "up")
        self.down.discard(node)

    def wrapper(self, node: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[node])

    def leftovers(self) -> list[str]:
        links = [line.split(":")[1].strip() for line in ip("-o", "link", "show").splitlines() if self.tag in line]
        return links + [line.split()[0] for line in ip("netns", "list").splitlines() if self.tag in line]

    def destroy(self) -> None:
        """Removes every link and namespace of this run (the processes in them must be gone)."""
        for name in (*self.links.values(), self.bridge):  # deleting one end of a veth deletes both
            try:
                ip("link", "del", name)
            except NetError:
                pass
        for namespace in self.namespaces.values():
            try:
                ip("netns", "del", namespace)
            except NetError:
                pass
        deadline = time.monotonic() + 10  # a namespace's own links go asynchronously
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.leftovers(), f"network test bed left behind: {self.leftovers()}"


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    network = Net(tag=f"mp{os.getpid() % 100000:05d}{secrets.token_hex(1)}", subnet="")
    try:
        try:
            network.create()
            for node in NODES:
                network.add_node(node)
        except NetError as exc:
            pytest.skip(f"cannot build network namespaces, veths and a bridge here: {exc}")
        yield network
    finally:
        network.destroy()


# -- the cluster: a coordinator on the bridge, an agent in each namespace ----------------


@dataclass
class Cluster:
    net: Net
    workdir: Path
    shm_base: str
    coordinator: CoordinatorProcess
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)  # nodes whose agent may end by SIGKILL (lost, or stuck)

    @property
    def address(self) -> str:
        return f"{self.net.gateway}:{self.coordinator.port}"

    def start_agent(self, node: str) -> AgentProcess:
        peer = f"{self.net.address_of(node)}:0"
        agent = AgentProcess(
            socket_path=self.workdir / f"{node}.sock",
            shm_prefix=f"{self.shm_base}-{node}.",
            memory_limit="1GiB",
            log_path=self.workdir / f"{node}.log",
            extra_args=[
                *("--on-exit", "remove", "--node", node, "--domain", f"rack{node.removeprefix('node')}"),
                *("--coordinator", self.address, "--token", TOKEN, "--advertise", peer, "--peer-listen", peer),
            ],
            wrapper=self.net.wrapper(node),
        )
        self.agents[node] = agent
        return agent.start()

    def lose(self, node: str) -> None:
        """What a dead machine does: its agent killed, its shared memory (slots and fragments) gone."""
        self.killed.add(node)
        self.agents[node].kill()
        for path in DEFAULT_ROOT.iterdir():
            if path.name.startswith((f"{self.shm_base}-{node}.", f"{self.shm_base}-{node}-")):
                path.unlink(missing_ok=True)

    def _stub(self, channel: grpc.Channel) -> cpb_grpc.CoordinatorServiceStub:
        return cpb_grpc.CoordinatorServiceStub(channel)

    def status(self) -> cpb.GetClusterStatusResponse:
        with grpc.insecure_channel(self.address) as channel:
            reply: cpb.GetClusterStatusResponse = self._stub(channel).GetClusterStatus(
                cpb.GetClusterStatusRequest(), metadata=token_metadata(TOKEN), timeout=10
            )
        return reply

    def alive(self) -> list[str]:
        return sorted(a.agent.node for a in self.status().agents if a.alive)

    def grouped(self) -> dict[str, int]:
        """Live nodes in a protection group -> the group's number."""
        return {a.agent.node: a.group for a in self.status().agents if a.alive and a.group >= 0}

    def protected_step(self, job: str) -> int:
        for job_status in self.status().jobs:
            for rank in job_status.ranks:
                if job_status.job == job and rank.rank == 0:
                    return int(rank.protected_step)
        return -1

    def locate(self, job: str) -> list[cpb.SnapshotLocation]:
        """Where rank 0's snapshots are; none while the coordinator is within its first lease."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = self._stub(channel).LocateSnapshots(
                    cpb.LocateSnapshotsRequest(job=job, rank=0), metadata=token_metadata(TOKEN), timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    return []
                raise
        return list(reply.locations)

    def fragments_of(self, job: str, step: int, generation: int) -> dict[int, str]:
        """Fragment index -> live holder of the (step, generation) of rank 0 of `job`, as the coordinator says."""
        for location in self.locate(job):
            if location.step == step and location.generation == generation:
                return {h.index: h.node for h in location.fragments}
        return {}

    def heartbeat_accepted(self, node: str, incarnation: int) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            reply = self._stub(channel).Heartbeat(
                cpb.HeartbeatRequest(node=node, incarnation=incarnation), metadata=token_metadata(TOKEN), timeout=10
            )
        return bool(reply.accepted)


@pytest.fixture
def cluster(net: Net, tmp_path: Path, shm_prefix: str) -> Iterator[Cluster]:
    coordinator = CoordinatorProcess(
        workdir=tmp_path,
        extra_args=[
            *("--listen", f"{net.gateway}:0", "--lease-s", str(LEASE_S), "--heartbeat-interval-s", str(HEARTBEAT_S)),
            *("--k", "2", "--m", "1", "--token", TOKEN),
        ],
    )
    result = Cluster(net=net, workdir=tmp_path, shm_base=shm_prefix.removesuffix("."), coordinator=coordinator)
    try:
        coordinator.start()
        with ThreadPoolExecutor(len(NODES)) as pool:
            list(pool.map(result.start_agent, NODES))
        wait_until(lambda: sorted(result.grouped()) == list(NODES), 30, "every agent in a protection group")
        yield result
    finally:
        for node in sorted(net.down):  # a clean stop needs no black hole
            net.heal(node)
        with ThreadPoolExecutor(len(NODES) + 1) as pool:
            codes = dict(zip(result.agents, pool.map(lambda agent: agent.stop(), result.agents.values())))
        assert coordinator.stop() in (0, None), f"see {coordinator.log_path}"
        # each agent has its own prefix (the shm_prefix fixture's own check does not see them): check them here;
        # only an agent that ended cleanly must have removed its shared memory
        leftovers = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(f"{result.shm_base}-"))
        for name in leftovers:
            (DEFAULT_ROOT / name).unlink(missing_ok=True)
        killed = tuple(f"{result.shm_base}-{node}{sep}" for node in result.killed for sep in ".-")
        unclean = [name for name in leftovers if not name.startswith(killed)]
        failed = {node: code for node, code in codes.items() if code not in (0, None) and node not in result.killed}
        culprits = sorted(set(failed) | {node for node in result.agents for name in unclean if f"-{node}" in name})
        tails = "\n".join(f"-- {node} (exit {codes[node]}):\n{log_tail(result.agents[node])}" for node in culprits)
        assert not unclean, f"agents left shared memory behind: {unclean}\n{tails}"
        assert not failed, f"agents did not stop cleanly: {failed}\n{tails}"


def log_tail(agent: AgentProcess, lines: int = 15) -> str:
    try:
        return "\n".join(agent.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def incarnations(agent: AgentProcess) -> list[int]:
    """The incarnations the agent was given, in order, from its log."""
    return [int(n) for n in REGISTERED.findall(agent.log_path.read_text())]


def committed_bytes(agent: AgentProcess, job: str, step: int) -> bytes:
    channel, stub = agent_stub(agent.socket_path)
    with channel:
        status = stub.GetStatus(apb.GetStatusRequest(), timeout=10)
    rank = next(r for r in status.ranks if r.job == job)
    slot = next(s for s in rank.slots if s.state == apb.SLOT_STATE_COMMITTED and s.step == step)
    path: Path = DEFAULT_ROOT / slot.name
    return path.read_bytes()[: slot.data_size_bytes]


def retrained(step: int) -> dict[str, Any]:
    """The state of `step` as a second attempt of the job computes it: same step, other bytes."""
    state = make_state(step)
    state["model"]["w"].neg_()
    state["optim"]["m"].add_(0.5)
    return state


# -- the must-show ------------------------------------------------------------------------


def test_a_cut_node_is_failed_by_its_lease_the_cluster_goes_on_and_its_return_corrupts_nothing(cluster: Cluster) -> None:
    agents, cut = cluster.agents, "node1"
    socket0 = agents["node0"].socket_path
    assert choose_fragment_holders("node0", NODES, 3) == ("node1", "node2", "node3")

    # before the cut: job "part" (owner node0, attempt 1) has step 1 protected, fragment 0 on node1;
    # job "side" runs on node1 itself
    first = make_state(1)
    with Checkpointer("part", rank=0, world_size=1, socket_path=socket0, strict=True, generation=1) as ck:
        ck.snapshot(1, first)
        ck.wait()
    wait_until(lambda: cluster.fragments_of("part", 1, 1) == {0: "node1", 1: "node2", 2: "node3"}, 30, "part step 1")
    side = Checkpointer("side", rank=0, world_size=1, socket_path=agents[cut].socket_path, strict=True)
    try:
        side.snapshot(1, make_state(1))
        side.wait()
        wait_until(lambda: cluster.protected_step("side") == 1, 30, "side step 1 to be protected")
        old_incarnation = incarnations(agents[cut])[-1]

        # the cut: node1's agent runs on, unreachable; its lease runs out and the cluster regroups without it
        cut_at = time.monotonic()
        cluster.net.cut(cut)
        wait_until(lambda: cut not in cluster.alive(), 5 * LEASE_S, "the coordinator to declare node1 failed")
        detected_s = time.monotonic() - cut_at
        assert LEASE_S - 2 * HEARTBEAT_S <= detected_s <= LEASE_S + 3, f"declared failed {detected_s:.1f}s after the cut"
        assert cluster.alive() == ["node0", "node2", "node3", "node4"]
        groups = cluster.grouped()
        assert sorted(groups) == ["node0", "node2", "node3", "node4"] and len(set(groups.values())) == 1, groups
        assert "lease of 1 node(s) ran out: node1" in cluster.coordinator.log_path.read_text()

        # a partition, not a crash: node1's agent is alive and its ranks snapshot on
        process = agents[cut].process
        assert process is not None and process.poll() is None
        assert is_serving(agents[cut].socket_path)
        side.snapshot(2, make_state(2))
        handle = side.wait()
        assert handle is not None and handle.committed
        # node0 hears its new group with its next heartbeat; a fragment it sent to node1 before that
        # hangs in the black hole until node0 abandons it for the new group (the next test)
        regrouped = "protection group now ['node0', 'node2', 'node3', 'node4']"
        wait_until(lambda: regrouped in agents["node0"].log_path.read_text(), 10, "node0 to hear its group")

        # meanwhile job "part" restarts (attempt 2) and snapshots step 1 again, with other bytes;
        # the group without node1 protects it
        second = retrained(1)
        with Checkpointer("part", rank=0, world_size=1, socket_path=socket0, strict=True, generation=2) as ck:
            restored = empty_like_state()
            assert ck.restore(restored, coordinate=False) == 1
            assert_state_equal(restored, first)
            ck.snapshot(1, second)
            ck.wait()
        wait_until(lambda: cluster.fragments_of("part", 1, 2) == {0: "node2", 1: "node3", 2: "node4"}, 30, "part step 1/2")
        wait_until(lambda: "unreachable" in agents[cut].log_path.read_text(), 15, "node1 to notice the coordinator is gone")
        assert cluster.alive() == ["node0", "node2", "node3", "node4"], "node1 came back through a cut link"

        # the link comes back: node1 registers again, as a new incarnation, and rejoins a group
        cluster.net.heal(cut)
        wait_until(lambda: sorted(cluster.grouped()) == list(NODES), 60, "node1 to rejoin a protection group")
        # (the agent logs its new incarnation when the reply arrives, which may be after the coordinator counts it)
        wait_until(lambda: incarnations(agents[cut])[-1] > old_incarnation, 15, "node1 to log its new incarnation")
        assert not cluster.heartbeat_accepted(cut, old_incarnation), "the old incarnation is fenced"

        # its stale fragment (attempt 1's step 1) is what it holds, labelled so, but nothing names it as current
        location = next(loc for loc in cluster.locate("part") if loc.step == 1)
        assert location.generation == 2
        assert {h.index: h.node for h in location.fragments} == {0: "node2", 1: "node3", 2: "node4"}
        assert all(cut not in {h.node for h in loc.fragments} for loc in cluster.locate("part"))
        addresses = {a.agent.node: a.agent.address for a in cluster.status().agents}
        peers = PeerClient(token=TOKEN, tls=TlsFiles())
        try:
            stale_header, stale = peers.get_fragment(addresses[cut], "part", 0, 0, 1)
            current_header, current = peers.get_fragment(addresses["node2"], "part", 0, 0, 1)
        finally:
            peers.close()
        assert (stale_header.step, stale_header.generation, stale_header.owner) == (1, 1, "node0")
        assert (current_header.step, current_header.generation) == (1, 2)
        assert stale != current, "same step and index, two attempts: mixing them would rebuild garbage"

        # what node1 protected for itself while cut reaches its holders once it is back
        wait_until(lambda: cluster.protected_step("side") == 2, 30, "side step 2 (taken while cut) to be protected")
    finally:
        side.close()

    # the attempt-2 snapshot restores bit-exactly from fragments alone, with index 0 only on node1 (stale):
    # the owner and the holder of attempt 2's fragment 0 die, a replacement node5 rebuilds from node3 and node4
    cluster.lose("node0")
    cluster.lose("node2")
    cluster.net.add_node("node5")
    node5 = cluster.start_agent("node5")
    # (an agent serves its socket a moment before it can reach peers: restore once it has registered)
    wait_until(lambda: "node5" in cluster.alive(), 30, "node5 to register")
    with Checkpointer("part", rank=0, world_size=1, socket_path=node5.socket_path, strict=True, generation=3) as ck:
        restored = empty_like_state()
        assert ck.restore(restored, coordinate=False) == 1
        assert_state_equal(restored, second)
        assert "rebuilt job=part rank=0 step=1 from fragments [1, 2]" in node5.log_path.read_text()

        # node1 is back in the group and receives new fragments: node5's next step puts fragment 0 on it
        wait_until(lambda: sorted(cluster.grouped()) == ["node1", "node3", "node4", "node5"], 30, "node0, node2 to fail")
        ck.snapshot(2, make_state(2))
        ck.wait()
    wait_until(lambda: cluster.fragments_of("part", 2, 3) == {0: "node1", 1: "node3", 2: "node4"}, 30, "part step 2")
    location = next(loc for loc in cluster.locate("part") if loc.step == 2)
    addresses = {h.index: h.address for h in location.fragments}
    peers = PeerClient(token=TOKEN, tls=TlsFiles())
    try:
        (header0, data0), (_, data1) = (peers.get_fragment(addresses[i], "part", 0, i, 2) for i in (0, 1))
    finally:
        peers.close()
    assert (header0.step, header0.generation, header0.owner) == (2, 3, "node5")
    expected = committed_bytes(node5, "part", 2)
    assert bytes(decode({0: data0, 1: data1}, Scheme(k=2, m=1, size_bytes=len(expected)))) == expected


def test_protection_goes_on_when_a_holder_is_cut_while_snapshots_keep_coming(cluster: Cluster) -> None:
    """A job snapshots every 0.2 s on node0 while node1, one of its fragment holders, is cut. Commits
    made before node1's lease runs out go towards the black hole; once the cluster has regrouped
    without node1, newer steps must be protected by the remaining nodes, as after a crash: the puts
    towards node1 are abandoned when the group changes, not held until a 300 s deadline."""
    socket0 = cluster.agents["node0"].socket_path
    with Checkpointer("live", rank=0, world_size=1, socket_path=socket0) as ck:
        step = 0

        def snapshot() -> None:
            nonlocal step
            step += 1
            ck.snapshot(step, make_state(step))
            ck.wait()
            time.sleep(0.2)

        snapshot()
        wait_until(lambda: cluster.protected_step("live") == 1, 30, "live step 1 to be protected")
        cluster.net.cut("node1")
        failed_by = time.monotonic() + 5 * LEASE_S
        while "node1" in cluster.alive():  # the lease: ~2 s of commits, some sent towards node1
            if time.monotonic() > failed_by:
                raise TimeoutError("the coordinator never declared node1 failed")
            snapshot()
        regrouped = step
        deadline = time.monotonic() + 8  # protection normally takes ~20 ms; the regroup is heard in 0.2 s
        while cluster.protected_step("live") <= regrouped and time.monotonic() < deadline:
            snapshot()
        protected, stats = cluster.protected_step("live"), ck.stats
    assert protected > regrouped, (
        f"8 s after the regroup at step {regrouped} (now step {step}), protected step is {protected}; "
        f"{stats.snapshots_committed} snapshots committed, {stats.failures['Unavailable']} skipped as Unavailable"
    )
