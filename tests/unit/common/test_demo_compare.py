"""The demo's verdict from the trainer's events (pure: events in, result out)."""

from __future__ import annotations

from typing import Any

from memckpt.demo import _compare, _Fault, _JobRun


def step(rank: int, number: int, attempt: int, loss: float) -> dict[str, Any]:
    return {"event": "step", "rank": rank, "step": number, "attempt": attempt, "loss_hex": float.hex(loss), "t": 1.0}


def restore(rank: int, number: int, attempt: int) -> dict[str, Any]:
    return {"event": "restore", "rank": rank, "step": number, "attempt": attempt, "restore_s": 0.01, "source": "local", "t": 2.0}


REFERENCE = _JobRun(events=[step(0, s, 0, 10.0 - s) for s in range(1, 7)])


def test_a_restored_step_no_rank_lived_to_log_is_not_a_mismatch() -> None:
    # the ranks committed step 4, then died in the all-reduce of its loss: nobody logged it
    events = [step(0, s, 0, 10.0 - s) for s in (1, 2, 3)] + [restore(0, 4, 1)]
    events += [step(0, s, 1, 10.0 - s) for s in (5, 6)]
    result = _compare(REFERENCE, _JobRun(events=events, faults=[_Fault(fault="rank", rank=0, kill_time=1.5)]), "w")
    assert result.bit_exact and result.mismatched_steps == []
    assert result.recoveries[0].restored_step == 4 and result.recoveries[0].steps_recomputed == 0


def test_a_step_missing_otherwise_or_a_different_loss_is_a_mismatch() -> None:
    events = [step(0, s, 0, 10.0 - s) for s in (1, 2)] + [restore(0, 2, 1)]
    events += [step(0, 3, 1, 7.0), step(0, 5, 1, 5.5), step(0, 6, 1, 4.0)]  # 4 never ran, 5 differs
    result = _compare(REFERENCE, _JobRun(events=events, faults=[_Fault(fault="rank", rank=0, kill_time=1.5)]), "w")
    assert not result.bit_exact and result.mismatched_steps == [4, 5]
