"""The bundled trainer on a GPU (NCCL, CUDA state) loses a rank, then its whole node, and resumes
bit for bit: from the node's slot, then from the fragments its peers hold. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memckpt.demo import DemoConfig, run_demo
from memckpt.local import read_events

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU path is tested with gloo ranks"),
]


def test_gpu_rank_survives_a_rank_kill_and_a_node_loss_bit_exact(tmp_path: Path) -> None:
    config = DemoConfig(
        ranks=1,  # one rank a GPU: a machine with one GPU runs one NCCL rank
        nodes=4,
        steps=16,
        seed=31,
        preset="tiny",
        faults=("rank", "node"),
        kill_rank=0,
        fault_steps=(5, 11),
        step_delay_s=0.2,  # the tiny model's steps are faster than protecting a snapshot
        workdir=tmp_path / "run",
        memory_limit="512MiB",
        timeout_s=300,
    )
    result = run_demo(config, progress=lambda _msg: None)
    starts = [e for path in (tmp_path / "run").glob("*.events.jsonl") for e in read_events(path) if e["event"] == "start"]
    assert starts and {e["device"] for e in starts} == {"cuda:0"}, f"the ranks did not train on the GPU: {starts}"
    before_faults = [s for s in result.mismatched_steps if s <= config.fault_steps[0]]  # type: ignore[index]
    assert not before_faults, f"the GPU run is not deterministic: losses differ before any fault, at {before_faults}"
    assert result.bit_exact, f"losses differ from the uninterrupted run at steps {result.mismatched_steps}"
    rank_fault, node_fault = result.recoveries
    assert rank_fault.sources == {0: "local"}, "a killed rank restores from its node's slot"
    assert node_fault.sources == {0: "fragments"}, "a lost node's rank restores from its peers' fragments"
    assert 0 < node_fault.restored_step <= node_fault.killed_after_step
