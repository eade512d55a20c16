"""Small helpers for integration tests: raw agent stubs and states to snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import torch

from memckpt.protos import agent_pb2_grpc as pb_grpc


def agent_stub(socket_path: Path) -> tuple[grpc.Channel, pb_grpc.AgentServiceStub]:
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    return channel, pb_grpc.AgentServiceStub(channel)


def make_state(step: int, size: int = 1 << 16) -> dict:
    """A state whose every tensor depends on `step`, so a mixed or torn restore shows."""
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(size, generator=generator), "b": torch.randn(64, generator=generator)},
        "optim": {"m": torch.full((size // 2,), float(step)), "step": torch.tensor(step)},
        "step": step,
    }


def empty_like_state(size: int = 1 << 16) -> dict:
    return {
        "model": {"w": torch.zeros(size), "b": torch.zeros(64)},
        "optim": {"m": torch.zeros(size // 2), "step": torch.tensor(0)},
    }


def assert_state_equal(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    for part in ("model", "optim"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}/{key} differs"


def losses(events: list[dict[str, Any]]) -> dict[int, str]:
    """step -> rank 0's loss as hex, from a trainer's events (bit-exact comparisons)."""
    return {e["step"]: e["loss_hex"] for e in events if e["event"] == "step" and e["rank"] == 0}
