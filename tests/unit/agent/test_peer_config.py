from __future__ import annotations

import pytest

from memckpt.agent.config import AgentConfig
from memckpt.errors import ConfigError


def test_advertise_port_zero_stands_for_the_bound_peer_port() -> None:
    config = AgentConfig(coordinator="c:1", advertise="10.0.0.5:0", peer_listen="0.0.0.0:0")
    assert config.advertised_address(41234) == "10.0.0.5:41234"
    assert AgentConfig(coordinator="c:1", advertise="10.0.0.5:7600").advertised_address(41234) == "10.0.0.5:7600"
    assert AgentConfig().peer_listen == "0.0.0.0:7500"


@pytest.mark.parametrize(
    "changes", [{"peer_listen": "7500"}, {"peer_listen": "h:port"}, {"peer_listen": "h:70000"}, {"advertise": ":1"}]
)
def test_bad_peer_addresses_are_config_errors(changes: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        AgentConfig(**changes)  # type: ignore[arg-type]
