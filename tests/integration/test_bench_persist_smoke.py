"""bench/persist.py runs in process on a tiny size and prints the JSON it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_bench_smoke import assert_positive, import_bench

pytestmark = pytest.mark.integration


def test_persist_bench_prints_writer_dd_and_both_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = import_bench("persist", monkeypatch)
    assert bench.main(["--size", "8MiB", "--rounds", "1", "--dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert_positive(report, ["persist_gbps", "dd_gbps", "memckpt_fs_restore_s", "dcp_load_s", "persist_vs_dd"])
    assert report["size_bytes"] >= 8 << 20
    assert list(tmp_path.iterdir()) == [], "the bench left its files behind"
