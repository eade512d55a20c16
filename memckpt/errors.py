"""The one exception hierarchy of memckpt; `memckpt.rpc` maps it to gRPC status codes."""

from __future__ import annotations


class MemckptError(Exception):
    """Base of every error memckpt raises on purpose."""


class ConfigError(MemckptError):
    """A configuration value is invalid; the message says which and why."""


class InvalidRequest(MemckptError):
    """A request is malformed: bad name, size, index or order."""


class NotFound(MemckptError):
    """The job, rank or snapshot asked for does not exist here."""


class BudgetExceeded(MemckptError):
    """Granting the request would take the agent over its memory budget."""


class StaleGeneration(MemckptError):
    """The request comes from an older generation or an out-of-order state."""


class FailedPrecondition(MemckptError):
    """The cluster is not in a state that allows the request: e.g. draining a node would leave
    too few agents to protect every rank."""


class PermissionDenied(MemckptError):
    """The caller may not do this here: e.g. a fragment the coordinator did not place on this agent."""


class CorruptSnapshot(MemckptError):
    """Stored bytes do not match their checksum; they are never loaded."""


class Unavailable(MemckptError):
    """The service cannot be reached or is restarting; retrying later may work."""
