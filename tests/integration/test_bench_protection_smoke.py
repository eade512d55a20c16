"""The protection benches (ec_throughput, peer_transfer) run in process on tiny sizes, against a
real coordinator and agents, and print the JSON they promise; no timing is asserted."""

from __future__ import annotations

import importlib
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from memckpt.agent.shm import DEFAULT_ROOT

pytestmark = pytest.mark.integration
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Puts bench/ on the path and gives the benches' agents a prefix of this test only;
    asserts (after removing them) that no shared memory with it is left."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # bench/ is scripts, not a package
    prefix = f"mct-bench-{uuid.uuid4().hex[:8]}-"
    monkeypatch.setattr(importlib.import_module("loopback"), "SHM_PREFIX_ROOT", prefix)
    yield prefix
    leftovers = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(prefix))
    for name in leftovers:
        (DEFAULT_ROOT / name).unlink(missing_ok=True)
    assert not leftovers, f"the bench left shared memory behind: {leftovers}"


def run_json(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert module.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict)
    return report


def assert_positive(value: object, what: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}={value!r}"
    assert math.isfinite(value) and value > 0, f"{what}={value!r}"


@pytest.mark.timeout(240)
def test_ec_throughput_bench_prints_every_figure(bench_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = importlib.import_module("ec_throughput")
    report = run_json(bench, ["--quick", "--size", "4MiB", "--json"], capsys)
    for key in ("encode_gbps", "decode_gbps", "zfec_encode_gbps_by_scheme"):
        rates = report[key]
        assert isinstance(rates, dict) and sorted(rates) == ["2,1", "4,2", "8,2"], f"{key}={rates!r}"
        for scheme, rate in rates.items():
            assert_positive(rate, f"{key}[{scheme}]")
    for key in ("zfec_encode_gbps", "xor_gbps", "reconstruct_s", "reconstruct_bytes", "raw_socket_gbps", "torch_load_s"):
        assert_positive(report[key], key)
    assert report["reconstruct_bytes"] == 4 << 20


@pytest.mark.timeout(240)
def test_peer_transfer_bench_prints_both_rates(
    bench_prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = importlib.import_module("peer_transfer")
    monkeypatch.setattr(bench, "tune_allocator", dict)  # leave this test process's malloc as it is
    report = run_json(bench, ["--quick", "--size", "4MiB", "--json"], capsys)
    for key in ("peer_gbps", "raw_socket_gbps", "get_gbps", "put_gbps"):
        assert_positive(report[key], key)
    assert report["fragment_bytes"] == 4 << 20
