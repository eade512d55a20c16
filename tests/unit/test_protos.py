from __future__ import annotations

from memckpt.protos.generate import stale_files


def test_generated_grpc_code_is_not_stale() -> None:
    assert stale_files() == [], "run `python -m memckpt.protos.generate` and commit the result"
