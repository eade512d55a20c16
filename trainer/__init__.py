"""The memckpt client API, used inside training code, and the bundled example trainer.

    from memckpt.trainer import Checkpointer, training_state, apply_training_state
"""

from memckpt.trainer.checkpointer import Checkpointer, CheckpointerStats, SnapshotHandle

__all__ = ["Checkpointer", "CheckpointerStats", "SnapshotHandle"]
