"""Prometheus metrics of real processes: a coordinator, four agents and the bundled trainer under
torchrun, scraped while it trains; a rank killed with SIGKILL and a node lost show up as what
they are, and so do the restores that follow, by their source."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from memckpt.local import (
    LocalCluster,
    Samples,
    read_events,
    sample,
    scrape,
    start_torchrun,
    stop_process,
    torchrun_command,
    wait_until,
)
from memckpt.protos import agent_pb2 as pb
from memckpt.protos import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

JOB = "metered"
METRICS = ("--metrics-listen", "127.0.0.1:0")


def agent_metrics_address(socket_path: Path) -> str:
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        reply = pb_grpc.AgentServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)  # type: ignore[no-untyped-call]
    assert reply.metrics_address, f"the agent at {socket_path} serves no metrics"
    return str(reply.metrics_address)


def value(samples: Samples, name: str, **labels: str) -> float:
    found = sample(samples, name, **labels)
    assert found is not None, f"{name}{labels} missing from the scrape"
    return found


def step_events(path: Path, rank: int, attempt: int) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["event"] == "step" and e["rank"] == rank and e["attempt"] == attempt]


def test_metrics_move_with_training_and_show_kills_and_restores_by_source(tmp_path: Path, shm_prefix: str) -> None:
    cluster = LocalCluster(
        workdir=tmp_path,
        nodes=4,
        memory_limit="256MiB",
        shm_prefix=shm_prefix,
        token=uuid.uuid4().hex,
        agent_args=METRICS,
        coordinator_args=METRICS,
    )
    try:
        cluster.start()
        coordinator = cluster.cluster_status().metrics_address
        agents = [agent_metrics_address(cluster.socket_of(host)) for host in range(4)]
        assert value(scrape(coordinator), "memckpt_agents", state="alive") == 4

        events = tmp_path / "train.events"
        args = [
            *("--job", JOB, "--preset", "tiny", "--seed", "3", "--socket", str(cluster.socket_template)),
            *("--events", str(events), "--step-delay-s", "0.1"),
        ]
        env = {**os.environ, "MEMCKPT_TRAINER_METRICS_LISTEN": "127.0.0.1:0"}
        command = torchrun_command(nproc=2, max_restarts=1, trainer_args=[*args, "--steps", "40"])
        process = start_torchrun(command, tmp_path / "train.log", env=env)
        try:
            wait_until(lambda: len(step_events(events, 1, 0)) >= 6, 120, "rank 1 at step 6")
            (trainer,) = [e["address"] for e in read_events(events) if e["event"] == "metrics" and e["rank"] == 0]
            before = scrape(agents[0]), scrape(coordinator), scrape(trainer)
            wait_until(lambda: len(step_events(events, 1, 0)) >= 14, 120, "rank 1 at step 14")
            after = scrape(agents[0]), scrape(coordinator), scrape(trainer)

            # the agent of rank 0: commits, bytes and the rank's step advance; memory is within budget
            for name in ("memckpt_snapshots_total", "memckpt_snapshot_bytes_total", "memckpt_commit_seconds_count"):
                assert value(after[0], name, job=JOB) > value(before[0], name, job=JOB) > 0, name
            assert value(after[0], "memckpt_committed_step", job=JOB, rank="0") > value(
                before[0], "memckpt_committed_step", job=JOB, rank="0"
            )
            assert 0 < value(after[0], "memckpt_memory_used_bytes") <= value(after[0], "memckpt_memory_budget_bytes")
            # protection follows the commits: rank 0's snapshots are encoded and sent to peers
            sent = lambda: value(scrape(agents[0]), "memckpt_fragment_sent_bytes_total")  # noqa: E731
            wait_until(lambda: sent() > 0, 60, "rank 0's snapshots sent to peers")
            assert value(scrape(agents[0]), "memckpt_ec_encode_seconds_count") > 0
            # the coordinator: the job's steps advance, protection follows
            committed = [value(scraped[1], "memckpt_job_committed_step", job=JOB) for scraped in (before, after)]
            assert committed[1] > committed[0], committed
            assert value(after[1], "memckpt_heartbeats_total") > value(before[1], "memckpt_heartbeats_total")
            assert value(after[1], "memckpt_job_generation", job=JOB) >= 1
            # the trainer's rank 0: its stalls and commits are counted as they happen
            labels = {"job": JOB, "rank": "0"}
            assert value(after[2], "memckpt_snapshot_stall_seconds_count", **labels) > value(
                before[2], "memckpt_snapshot_stall_seconds_count", **labels
            )
            assert value(after[2], "memckpt_client_snapshots_total", **labels) > 0

            victim = step_events(events, 1, 0)[-1]
            os.kill(victim["pid"], signal.SIGKILL)  # torchrun restarts both ranks; they restore from their agents
            assert process.wait(timeout=240) == 0, (tmp_path / "train.log").read_text()[-3000:]
        finally:
            stop_process(process)

        rank1_agent = scrape(agents[1])
        assert value(rank1_agent, "memckpt_rank_deaths_total", job=JOB) >= 1, "the SIGKILLed rank's session ended uncleanly"
        assert value(rank1_agent, "memckpt_restores_total", job=JOB, source="local") == 1
        assert value(scrape(agents[0]), "memckpt_restores_total", job=JOB, source="local") == 1

        # the finished job's last step gets protected for every rank (so both ranks resume from it)
        protected = lambda: value(scrape(coordinator), "memckpt_job_protected_step", job=JOB)  # noqa: E731
        wait_until(lambda: protected() == 40, 60, "step 40 protected for every rank")
        assert value(scrape(coordinator), "memckpt_job_protect_lag_steps", job=JOB) == 0
        # node 1 is lost: the coordinator counts the failure; its replacement rebuilds rank 1
        failures = value(scrape(coordinator), "memckpt_agent_failures_total")
        cluster.lose_node(1)
        wait_until(lambda: value(scrape(coordinator), "memckpt_agents", state="failed") == 1, 60, "the lost agent failed")
        assert value(scrape(coordinator), "memckpt_agent_failures_total") == failures + 1
        cluster.replace_node(1)
        replacement = agent_metrics_address(cluster.socket_of(1))
        command = torchrun_command(nproc=2, max_restarts=0, trainer_args=[*args, "--steps", "44"])
        process = start_torchrun(command, tmp_path / "resume.log")
        try:
            assert process.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        finally:
            stop_process(process)
        assert value(scrape(replacement), "memckpt_restores_total", job=JOB, source="fragments") == 1
        # every data fragment's holder lives: the rank fetched them itself, nothing was decoded here
        assert value(scrape(replacement), "memckpt_direct_restores_total", job=JOB) == 1
        assert value(scrape(replacement), "memckpt_ec_decode_seconds_count") == 0
        assert value(scrape(agents[0]), "memckpt_restores_total", job=JOB, source="local") == 2
    finally:
        cluster.stop()
