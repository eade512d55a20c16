"""A rank of a torchrun job is killed (SIGKILL) mid-run; the job resumes from memory, bit for bit."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from memckpt.demo import DemoConfig, run_demo

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("snapshot_every,seed", [(1, 11), (3, 12)])
def test_rank_killed_at_random_step_resumes_bit_exact(tmp_path: Path, snapshot_every: int, seed: int) -> None:
    steps = 14
    kill_at = random.Random(seed).randint(3, steps - 3)
    config = DemoConfig(
        ranks=2,
        steps=steps,
        snapshot_every=snapshot_every,
        seed=seed,
        preset="tiny",
        faults=("rank",),
        kill_rank=seed % 2,
        fault_steps=(kill_at,),
        # a real model's steps take longer than protecting a snapshot; the tiny one's (70 ms on a
        # busy 2-core machine) do not, and a slot kept for protection skips a snapshot
        step_delay_s=0.15,
        workdir=tmp_path / "run",
        memory_limit="256MiB",
        timeout_s=240,
    )
    result = run_demo(config, progress=lambda _msg: None)
    assert result.bit_exact, f"losses differ from the uninterrupted run at steps {result.mismatched_steps}"
    assert result.final_loss == result.reference_final_loss
    (recovery,) = result.recoveries
    assert recovery.killed_after_step >= kill_at
    assert recovery.restored_step % snapshot_every == 0 and recovery.restored_step > 0
    assert 0 <= recovery.steps_recomputed <= snapshot_every
    assert set(recovery.sources.values()) == {"local"}, "a trainer crash restores from the node's own memory"


def test_node_lost_under_torchrun_resumes_from_peers_fragments_bit_exact(tmp_path: Path) -> None:
    """3 ranks on 3 of 5 agents: rank 1's node (agent, rank, shared memory) is lost; a replacement
    agent joins; all ranks restore the same step, rank 1 from its peers' fragments."""
    config = DemoConfig(
        ranks=3,
        nodes=5,
        steps=16,
        seed=21,
        preset="tiny",
        faults=("node",),
        kill_rank=1,
        fault_steps=(9,),
        step_delay_s=0.2,  # steps of a real model take longer than protection; the tiny one's do not
        workdir=tmp_path / "run",
        memory_limit="256MiB",
        timeout_s=300,
    )
    result = run_demo(config, progress=lambda _msg: None)
    (recovery,) = result.recoveries
    assert recovery.lost_node == "node1" and recovery.replacement_node == "node5"
    assert recovery.sources[1] == "fragments", "the lost rank's state can only come from its peers"
    assert set(recovery.sources) == {0, 1, 2}
    assert 0 < recovery.restored_step <= recovery.killed_after_step
    assert result.bit_exact, f"losses differ from the uninterrupted run at steps {result.mismatched_steps}"
    assert result.final_loss == result.reference_final_loss


def test_memckpt_demo_json_prints_the_promised_keys(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "memckpt.cli",
        "demo",
        "--json",
        "--preset",
        "tiny",
        "--steps",
        "10",
        "--ranks",
        "3",
        "--kill-rank",
        "2",
        "--seed",
        "5",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert {"steps_recomputed", "recovery_s", "final_loss", "reference_final_loss", "bit_exact"} <= result.keys()
    assert result["bit_exact"] is True and result["final_loss"] == result["reference_final_loss"]
    assert result["recovery_s"] > 0 and result["steps_recomputed"] >= 0
    assert [r["fault"] for r in result["recoveries"]] == ["rank", "node"], "the default faults, in order"
    assert result["recoveries"][1]["sources"]["2"] == "fragments", "the lost rank 2 came back from fragments"
