"""memckpt: fault-tolerant in-memory checkpointing for PyTorch training.

The client API lives in `memckpt.trainer` (`Checkpointer`), the node daemon in
`memckpt.agent`, the generated gRPC code in `memckpt.protos`.
"""

__version__ = "0.1.0"
