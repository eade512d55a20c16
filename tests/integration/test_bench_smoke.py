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
def test_train_overhead_bench_prints_both_rates(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = import_bench("train_overhead", monkeypatch)
    report = run_json(bench, ["--preset", "tiny", "--steps", "4", "--json"], capsys)
    assert_positive(report, ["steps_per_s_off", "steps_per_s_every_step"])
    overhead = report["overhead_pct"]
    assert isinstance(overhead, float) and math.isfinite(overhead)  # noise may make it negative
    assert (report["preset"], report["ranks"], report["steps"]) == ("tiny", 2, 4)
