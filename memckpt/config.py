"""Process configuration: one frozen dataclass per process, filled from four layers.

Precedence: field defaults < TOML file (`--config`) < `MEMCKPT_<FIELD>` environment <
command-line flags. Flags are derived from the fields (`memory_limit` -> `--memory-limit`)
with the field's `help` metadata; unknown TOML keys are errors, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from memckpt.errors import ConfigError
from memckpt.sizes import parse_size

C = TypeVar("C")
ENV_PREFIX = "MEMCKPT_"


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """`host:port` (the host may be `[v6]`) as a pair; raises ConfigError naming `what`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {address!r} must be host:port with a port in 0..65535")
    return host, int(port)


def field(default: Any, help: str, *, size: bool = False, choices: tuple[str, ...] | None = None, default_text: str = "") -> Any:
    """A config field: its default (or how a None default is derived), its flag's help, how to parse it."""
    meta = {"help": help, "size": size, "choices": choices, "default_text": default_text}
    return dataclasses.field(default=default, metadata=meta)


def add_flags(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Adds `--config` and one flag per field of `cls`; flags default to None (not given)."""
    parser.add_argument("--config", type=Path, help="TOML file with any of the settings below")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = meta["default_text"] or f.default
        help_text = f"{meta['help']} (default: {default}; env {ENV_PREFIX}{f.name.upper()})"
        if _base_type(cls, f.name) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, choices=meta.get("choices"), help=help_text, metavar=f.name.upper())


def load_config(cls: Callable[..., C], args: argparse.Namespace, env: Mapping[str, str] | None = None) -> C:
    """Builds the config from the layers; raises ConfigError naming the key and the layer."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if getattr(args, "config", None):
        try:
            table = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc}") from exc
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"config file {args.config}: unknown keys {unknown}; known: {sorted(names)}")
        values.update({k: (k, v, f"file {args.config}") for k, v in table.items()})
    for name in names:
        if f"{ENV_PREFIX}{name.upper()}" in env:
            values[name] = (name, env[f"{ENV_PREFIX}{name.upper()}"], "environment")
        if getattr(args, name, None) is not None:
            values[name] = (name, getattr(args, name), "flag")
    parsed = {name: _convert(cls, *entry) for name, entry in values.items()}
    return cls(**parsed)


def to_json(config: Any) -> str:
    """The effective config as one JSON line, for the start-up log."""
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}, sort_keys=True)


def _convert(cls: Any, name: str, value: Any, layer: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = _base_type(cls, name)
    try:
        if f.metadata.get("size") and isinstance(value, str):
            return parse_size(value)
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{value!r} is not a boolean")
            return value.lower() in ("1", "true", "yes")
        return kind(value)
    except (ValueError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{name} from {layer}: {exc}") from exc


def _base_type(cls: Any, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
