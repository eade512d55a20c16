"""The one place where memckpt errors become gRPC status codes, and back.

Servicers wrap their methods in `map_errors`; clients turn a failed call into the
same exception type with `error_from_rpc`, so both sides speak `memckpt.errors`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from memckpt import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.MemckptError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StaleGeneration: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.CorruptSnapshot: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
# back from a status code: FAILED_PRECONDITION stays StaleGeneration, which clients of the data path handle
_EXCEPTION = {code: exc for exc, code in STATUS.items() if exc not in (errors.ConfigError, errors.FailedPrecondition)}

F = TypeVar("F", bound=Callable[..., Any])


def _abort(rpc: str, exc: Exception, context: grpc.ServicerContext) -> None:
    """Ends the call with the status of a memckpt error; anything else is INTERNAL and logged."""
    if isinstance(exc, errors.MemckptError):
        code = STATUS.get(type(exc), grpc.StatusCode.INTERNAL)
        log.info("rpc=%s status=%s error=%s", rpc, code.name, exc)
        context.abort(code, str(exc))
    log.error("rpc=%s failed", rpc, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def map_errors(method: F) -> F:
    """Aborts the call with the status of a memckpt error; anything else is INTERNAL and logged."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # the servicer must answer, never hang up silently
            _abort(method.__name__, exc, context)

    return wrapper  # type: ignore[return-value]


def map_stream_errors(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """`map_errors` for response-streaming methods: their errors surface while the reply is iterated.

    The wrapper is itself a generator, so an error after some messages were sent still
    aborts the call with its status instead of ending the stream as if it were whole.
    """

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # the servicer must answer, never hang up silently
            _abort(method.__name__, exc, context)

    return wrapper


def error_from_rpc(exc: grpc.RpcError, what: str) -> errors.MemckptError:
    """The memckpt error that a failed call stands for; `what` says which call it was."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"{what}: {code.name}: {details}")
    return exception_for_status(code)(f"{what}: {details}")


def exception_for_status(code: grpc.StatusCode) -> type[errors.MemckptError]:
    """The memckpt error class a status code stands for (MemckptError for one no error maps to)."""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.Unavailable
    return _EXCEPTION.get(code, errors.MemckptError)
