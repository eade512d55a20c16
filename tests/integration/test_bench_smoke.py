"""Each bench's `main()` runs in process on tiny sizes and prints the JSON it promises."""

from __future__ import annotations

import importlib
import json
import math
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from memckpt.agent.shm import DEFAULT_ROOT

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
PREFIX = f"memckpt-bench-{uuid.uuid4().hex[:6]}-"


def import_bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # bench/ is scripts, not a package
    module = importlib.import_module(name)
    # this test's own prefix, so that a bench run by another checkout at the same time does not count
    monkeypatch.setattr(importlib.import_module("snapshot_stall"), "SHM_PREFIX_ROOT", PREFIX)
    return module


def bench_segments() -> set[str]:
    return {p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(PREFIX)}


def run_json(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert module.main(argv) == 0
    assert bench_segments() == set(), "the bench left shared memory behind"
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    return report


def assert_positive(report: dict[str, object], keys: list[str]) -> None:
    for key in keys:
        value = report[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}={value!r}"
        assert math.isfinite(value) and value > 0, f"{key}={value!r}"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_snapshot_stall_bench_prints_every_figure(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = import_bench("snapshot_stall", monkeypatch)
    report = run_json(bench, ["--size", "8MiB", "--repeats", "2", "--quick", "--json"], capsys)
    assert_positive(
        report,
        [
            "copy_floor_s",
            "memckpt_stall_s",
            "memckpt_first_stall_s",
            "torch_save_s",
            "dcp_save_s",
            "dcp_async_save_s",
            "memckpt_restore_s",
            "torch_load_s",
            "dcp_load_s",
            "size_bytes",
            "stall_vs_floor",
            "torch_save_over_stall",
            "dcp_async_over_stall",
            "torch_load_over_restore",
        ],
    )
    assert isinstance(report["dcp_async_config"], str) and report["dcp_async_config"]
    assert report["size_bytes"] == 8 << 20


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_train_overhead_bench_prints_the_rates_off_on_and_persisting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = import_bench("train_overhead", monkeypatch)
    report = run_json(bench, ["--preset", "tiny", "--steps", "6", "--persist-every", "4", "--json"], capsys)
    assert_positive(report, ["steps_per_s_off", "steps_per_s_every_step", "steps_per_s_persist", "persist_vs_off"])
    overhead = report["overhead_pct"]
    assert isinstance(overhead, float) and math.isfinite(overhead)  # noise may make it negative
    assert (report["preset"], report["ranks"], report["steps"], report["persist_every"]) == ("tiny", 2, 6, 4)
    assert report["persisted_checkpoints"] == 1  # step 4, the only multiple of 4 of the 6 steps


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_train_overhead_bench_with_protection_prints_rates_and_lag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = import_bench("train_overhead", monkeypatch)
    argv = ["--protect", "--preset", "tiny", "--steps", "30", "--sample-interval-s", "0.05", "--json"]
    report = run_json(bench, [*argv, "--agent-arg=--protect-rate=256MiB", "--agent-arg=--protect-cpu=1"], capsys)
    assert_positive(report, ["steps_per_s_off", "steps_per_s_protected", "protected_vs_off", "lag_samples"])
    assert (report["preset"], report["ranks"], report["nodes"], report["k"], report["m"]) == ("tiny", 2, 4, 2, 1)
    for lag in ("protect_lag_steps", "protect_lag_job_steps"):
        median, worst = report[f"{lag}_median"], report[f"{lag}_max"]
        assert isinstance(median, float) and isinstance(worst, int), lag
        assert 0 <= median <= worst <= 30, lag  # a lag is a number of steps of this run
    job_worst, own_worst = report["protect_lag_job_steps_max"], report["protect_lag_steps_max"]
    assert isinstance(job_worst, int) and isinstance(own_worst, int) and job_worst >= own_worst  # no rank is ahead of the job
    skipped, taken = report["snapshots_skipped"], report["snapshots_taken"]
    assert isinstance(skipped, int) and isinstance(taken, int) and 0 <= skipped < taken == 30 * 2
    for key in ("agent_cores_off", "agent_cores_protected"):
        value = report[key]
        assert isinstance(value, float) and 0 <= value < 64, f"{key}={value!r}"
