"""gRPC services of memckpt: the `.proto` files and the Python generated from them.

Regenerate with `python -m memckpt.protos.generate`; a test fails when the generated code is stale.
"""
