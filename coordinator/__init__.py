"""The memckpt coordinator: membership, protection groups, step bookkeeping, recovery plans.

Not built yet: the one-node agent works without it (see the issue on cross-node protection).
"""
