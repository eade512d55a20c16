"""The CUDA snapshot path (pinned slots, side stream, pre-hook) on a real GPU; skipped without one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; bench/gpu_check.py runs this path on one"),
]


def test_cuda_snapshot_restores_bit_exact_through_pinned_slots() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_check

    result = gpu_check.run(64 << 20, repeats=2)
    assert result["slots_pinned"], "slot memory was not registered as pinned"
    assert result["restore_bit_exact"]
    assert result["prehook_orders_update"], "optimizer.step() changed a parameter before the copy read it"
