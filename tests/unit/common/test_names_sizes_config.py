from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memckpt.agent.config import AgentConfig
from memckpt.agent.daemon import build_parser
from memckpt.config import load_config
from memckpt.errors import ConfigError, InvalidRequest
from memckpt.names import check_name, safe_join
from memckpt.sizes import format_size, parse_size


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "x" * 65, "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_safe_join_stays_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "job-1.r0") == (tmp_path / "job-1.r0").resolve()
    with pytest.raises(InvalidRequest):
        safe_join(tmp_path, "..")


@pytest.mark.parametrize(
    "text,value",
    [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("4G", 4 << 30), ("2GB", 2 * 10**9), ("1024", 1024), ("1.5KiB", 1536)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        parse_size("lots")
    assert format_size(3 << 30) == "3.0 GiB"


def test_config_precedence_file_env_flag(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('memory_limit = "1GiB"\nnode = "from-file"\non_exit = "remove"\n')
    args = build_parser().parse_args(["--config", str(toml), "--node", "from-flag"])
    env = {"MEMCKPT_MEMORY_LIMIT": "2GiB", "MEMCKPT_NODE": "from-env"}
    config = load_config(AgentConfig, args, env)
    assert (config.memory_limit, config.node, config.on_exit) == (2 << 30, "from-flag", "remove")


def test_unknown_config_keys_and_bad_values_are_errors(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text("memory_limt = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(AgentConfig, build_parser().parse_args(["--config", str(toml)]), {})
    with pytest.raises(ConfigError, match="memory_limit from environment"):
        load_config(AgentConfig, argparse.Namespace(), {"MEMCKPT_MEMORY_LIMIT": "much"})
    with pytest.raises(ConfigError, match="shm_prefix"):
        AgentConfig(shm_prefix="../x.")


def test_agent_flag_set_is_frozen() -> None:
    flags = sorted(a.option_strings[0] for a in build_parser()._actions if a.option_strings)
    assert flags == [
        "--advertise",
        "--config",
        "--coordinator",
        "--direct-restore",
        "--domain",
        "--log-level",
        "--max-message-bytes",
        "--memory-limit",
        "--metrics-listen",
        "--node",
        "--on-exit",
        "--peer-bulk",
        "--peer-bulk-port",
        "--peer-listen",
        "--persist-every",
        "--persist-interval-s",
        "--persist-keep",
        "--persist-keep-every",
        "--persist-on-failure",
        "--persist-rate",
        "--persist-root",
        "--protect-cpu",
        "--protect-rate",
        "--put-min-rate-bytes-per-s",
        "--restore-wait-s",
        "--shm-dir",
        "--shm-prefix",
        "--socket",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--token",
        "--token-file",
        "-h",
    ]
