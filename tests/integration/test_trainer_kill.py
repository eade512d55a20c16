"""A rank of a torchrun job is killed (SIGKILL) mid-run, then its whole node is lost; the job resumes from memory, bit for bit."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from memckpt.demo import DemoConfig, run_demo

pytestmark = pytest.mark.integration


def test_rank_killed_at_random_step_with_a_snapshot_every_3_steps_resumes_bit_exact(tmp_path: Path) -> None:
    """(A snapshot every step, and the loss of a whole node, are the demo's defaults: the next test.)"""
    steps, snapshot_every, seed = 14, 3, 12
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


def test_memckpt_demo_json_a_rank_killed_then_its_node_lost_resumes_bit_exact(tmp_path: Path) -> None:
    """The README's main command (`memckpt demo --json`), with its default faults: 3 ranks on 4
    agents; rank 2 is SIGKILLed (restores from its node's memory), then its node is lost (agent,
    rank, shared memory): a replacement agent joins, all ranks restore the same step, rank 2
    from its peers' fragments, and the losses equal an uninterrupted run's bit for bit."""
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
    killed, lost = result["recoveries"]
    assert killed["rank"] == 2 and killed["restored_step"] > 0 and 0 <= killed["steps_recomputed"] <= 1
    assert killed["sources"] == {"0": "local", "1": "local", "2": "local"}, "a trainer crash restores from its node"
    assert lost["lost_node"] == "node2" and lost["replacement_node"] == "node4"
    assert lost["sources"]["2"] == "fragments", "the lost rank's state can only come from its peers"
    assert set(lost["sources"]) == {"0", "1", "2"}
    assert 0 < lost["restored_step"] <= lost["killed_after_step"]
