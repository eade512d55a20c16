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
        kill_rank=seed % 2,
        kill_at_step=kill_at,
        workdir=tmp_path / "run",
        memory_limit="256MiB",
        timeout_s=240,
    )
    result = run_demo(config, progress=lambda _msg: None)
    assert result.bit_exact, f"losses differ from the uninterrupted run at steps {result.mismatched_steps}"
    assert result.final_loss == result.reference_final_loss
    assert result.kill_step >= kill_at
    assert result.restored_step % snapshot_every == 0 and result.restored_step > 0
    assert 0 <= result.steps_recomputed <= snapshot_every


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
    assert result["recovery_s"] > 0 and 0 <= result["steps_recomputed"] <= 1
