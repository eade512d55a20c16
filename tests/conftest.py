"""Shared fixtures: a private agent per test, with its own socket and shm prefix, cleaned up after."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memckpt.agent.shm import DEFAULT_ROOT
from memckpt.local import AgentProcess, make_test_certificates
from memckpt.security import TlsFiles


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A prefix no other test (or checkout) uses; asserts that nothing with it is left in shm."""
    prefix = f"mct-{uuid.uuid4().hex[:12]}."
    yield prefix
    leftovers = sorted(p.name for p in DEFAULT_ROOT.iterdir() if p.name.startswith(prefix))
    for name in leftovers:
        (DEFAULT_ROOT / name).unlink(missing_ok=True)
    assert not leftovers, f"test left shared memory behind: {leftovers}"


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agent_factory(tmp_path: Path, shm_prefix: str) -> Iterator[AgentFactory]:
    """Starts agents that remove their slots on a clean stop; every one is stopped at teardown."""
    started: list[AgentProcess] = []

    def start(
        memory_limit: str = "1GiB", name: str = "agent", extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> AgentProcess:
        agent = AgentProcess(
            socket_path=tmp_path / f"{name}.sock",
            shm_prefix=shm_prefix,
            memory_limit=memory_limit,
            log_path=tmp_path / f"{name}.log",
            extra_args=["--on-exit", "remove", *extra_args],
            env=env,
        )
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        code = agent.stop()
        assert code in (0, -9, None), f"agent exited with {code}; see {agent.log_path}"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A private CA and one certificate it signed for 127.0.0.1 / localhost, usable by servers
    and by clients (mutual TLS), made with the openssl command line."""
    return make_test_certificates(tmp_path_factory.mktemp("tls"))
