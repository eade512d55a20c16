"""The memckpt coordinator: membership, protection groups, step bookkeeping, recovery plans.

Pure deciders (`membership`, `groups`, `plan`, `cluster`) under a thin gRPC service (`service`,
`daemon`). Agents do not report to it yet: that, fragments on peers and restore from them
are the rest of the cross-node protection issue.
"""
