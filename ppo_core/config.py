"""Stage configs: frozen dataclasses loaded from JSON or YAML files.

Every stage config is a ``@dataclass(frozen=True)`` whose fields carry a docstring; nested
dataclasses (e.g. :class:`ppo_core.strategy.StrategyConfig`) are nested mappings in the file,
and a partial one changes only its keys of the field's own default (as the pipeline's stage
configs do).
Loading is strict: an unknown key or a value of the wrong type is an error that names the
file, the field and what to change, because a silently ignored typo (``learning_rte``) would
train with the default and nobody would notice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says what to change."""


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file that holds one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only needed for YAML configs

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError
        raise ConfigError(f"config file {path} is not valid {path.suffix or 'JSON'}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Build the dataclass ``cls`` from a JSON/YAML file; unknown keys raise :class:`ConfigError`."""
    return from_dict(cls, read_mapping(path), where=str(path))


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build the dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    ``where`` prefixes error messages (a file name, then ``file:field.subfield``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; "
            f"valid keys are {sorted(fields)}. Fix the spelling or remove them."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            # a partial mapping changes only its keys: PPOConfig's strategy defaults to ZeRO-0,
            # and {"cpu_threads": 1} must not bring back StrategyConfig's own ZeRO-2
            value = {**to_dict(default), **value}
        kwargs[name] = _coerce(hints[name], value, f"{where}:{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a (nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as JSON so that :func:`load_config` reads it back unchanged."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True), encoding="utf-8")


def parse_cli(cls: type[T], argv: Sequence[str] | None, prog: str) -> T:
    """Parse ``--config FILE`` (the stage entry points' only argument) into ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Train with a {cls.__name__} file.")
    parser.add_argument("--config", required=True, help="JSON or YAML file with the stage config")
    args = parser.parse_args(list(argv) if argv is not None else None)
    return load_config(cls, args.config)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int->float is the only silent widening."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (inner, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
