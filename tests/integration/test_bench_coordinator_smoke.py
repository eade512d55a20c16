"""`bench/coordinator_scale.py --quick --json` runs end to end and prints every figure it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "coordinator_scale.py"
POSITIVE = [
    "agents",
    "ranks",
    "heartbeats",
    "heartbeats_per_s",
    "heartbeat_p50_ms",
    "heartbeat_p99_ms",
    "inventory_entries",
    "register_s",
    "plan_s",
    "plan_again_s",
    "plan_compute_s",
    "plan_sources",
    "locate_all_s",
    "locate_p50_ms",
    "locate_compute_s",
]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_coordinator_scale_bench_prints_every_figure() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    for key in POSITIVE:
        value = report[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r}"
        assert math.isfinite(value) and value > 0, f"{key}={value!r}"
    assert report["agents"] == 100 and report["ranks"] == 800 and report["plan_sources"] == 800
    assert 0 <= report["heartbeats_on_time"] <= 1
    assert isinstance(report["heartbeat_target_met"], bool) and isinstance(report["plan_target_met"], bool)
