"""The memckpt client API, used inside training code, and the bundled example trainer.

from memckpt.trainer import Checkpointer, training_state, apply_training_state
"""

from memckpt.trainer.checkpointer import Checkpointer, CheckpointerStats, SnapshotHandle
from memckpt.trainer.state import (
    apply_training_state,
    refresh_training_state,
    rng_state,
    set_rng_state,
    training_state,
)

__all__ = [
    "Checkpointer",
    "CheckpointerStats",
    "SnapshotHandle",
    "apply_training_state",
    "refresh_training_state",
    "rng_state",
    "set_rng_state",
    "training_state",
]
