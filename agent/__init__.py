"""The memckpt node agent: slots in shared memory, their manifest, checksums, and the gRPC service."""
