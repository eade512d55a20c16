"""The persister's thread outlives what goes wrong in a round."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from memckpt.agent.persist import Persister, PersistPolicy, StepChooser
from memckpt.agent.slots import MemoryBudget


class FailingOnceStore:
    """persist_work raises once (a bug, an unforeseen error), then has nothing to do."""

    def __init__(self) -> None:
        self.calls = 0
        self.asked_again = threading.Event()

    def persist_work(self) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        self.asked_again.set()
        return []


def test_an_unexpected_error_in_a_round_does_not_end_the_persister(tmp_path: Path) -> None:
    store = FailingOnceStore()
    persister = Persister(
        store=store,  # type: ignore[arg-type]
        budget=MemoryBudget(limit_bytes=1 << 20),
        root=tmp_path,
        rate=0,
        keep=1,
        keep_every=0,
        world_size=lambda job: 1,
        finalize_here=lambda job: True,
        chooser=StepChooser(PersistPolicy(every_steps=1)),
    )
    persister.start()
    try:
        assert store.asked_again.wait(10), "the persister stopped after the error"
    finally:
        persister.stop()
