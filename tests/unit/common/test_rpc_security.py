from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from memckpt.agent.config import AgentConfig
from memckpt.coordinator.config import CoordinatorConfig
from memckpt.errors import ConfigError, CorruptSnapshot, PermissionDenied
from memckpt.rpc import error_from_rpc, map_stream_errors
from memckpt.security import TokenInterceptor, read_token_file, resolve_token, token_metadata


class Aborted(Exception):
    pass


class FakeContext:
    """Records the status a servicer aborts with; raises like grpc's context does."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


@dataclass(frozen=True)
class Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def behaviour(handler: Any) -> Any:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


@pytest.mark.parametrize("request_streaming,response_streaming", [(False, False), (False, True), (True, False), (True, True)])
def test_token_refusal_has_the_kind_of_the_method_it_refuses(request_streaming: bool, response_streaming: bool) -> None:
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    real = kinds[(request_streaming, response_streaming)](lambda request, context: None)
    interceptor = TokenInterceptor("s3cret")
    for metadata in ((), token_metadata("wrong")):
        denied = interceptor.intercept_service(lambda _: real, Details("/memckpt.v1.PeerService/X", metadata))
        assert (denied.request_streaming, denied.response_streaming) == (request_streaming, response_streaming)
        context = FakeContext()
        with pytest.raises(Aborted):
            behaviour(denied)(iter(()) if request_streaming else b"", context)
        assert context.code == grpc.StatusCode.UNAUTHENTICATED
    passed = interceptor.intercept_service(lambda _: real, Details("/memckpt.v1.PeerService/X", token_metadata("s3cret")))
    assert passed is real


def test_unknown_methods_stay_unknown_without_a_token() -> None:
    assert TokenInterceptor("t").intercept_service(lambda _: None, Details("/x.Y/Z", ())) is None


def test_stream_errors_abort_with_their_status_even_after_messages_were_sent() -> None:
    class Servicer:
        @map_stream_errors
        def Stream(self, request: Any, context: Any) -> Iterator[int]:
            yield 1
            raise CorruptSnapshot("bad bytes")

        @map_stream_errors
        def Boom(self, request: Any, context: Any) -> Iterator[int]:
            raise KeyError("x")
            yield 0

    context = FakeContext()
    replies = Servicer().Stream(None, context)
    assert next(replies) == 1
    with pytest.raises(Aborted, match="bad bytes"):
        next(replies)
    assert context.code == grpc.StatusCode.DATA_LOSS
    context = FakeContext()
    with pytest.raises(Aborted):
        list(Servicer().Boom(None, context))
    assert context.code == grpc.StatusCode.INTERNAL


def test_permission_denied_round_trips_through_its_status() -> None:
    class Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self) -> str:
            return "not placed here"

    assert isinstance(error_from_rpc(Failed(), "PutFragment"), PermissionDenied)


def test_a_token_file_gives_its_first_line_and_must_be_safe(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret \nignored\n")
    path.chmod(0o600)
    assert read_token_file(path) == "s3cret"
    assert resolve_token("", path) == "s3cret" and resolve_token("t", None) == "t"
    with pytest.raises(ConfigError, match="not both"):
        resolve_token("t", path)
    path.chmod(0o620)
    with pytest.raises(ConfigError, match="writable by group or others"):
        read_token_file(path)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_the_daemons_configs_read_the_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    assert CoordinatorConfig(token_file=path).token == "s3cret"
    assert AgentConfig(token_file=path, socket=tmp_path / "a.sock").token == "s3cret"
    with pytest.raises(ConfigError, match="not both"):
        CoordinatorConfig(token="x", token_file=path)
