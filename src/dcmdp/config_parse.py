"""Reading config values: a YAML file into a mapping, and one YAML / command-line value into the
type its field declares. Mistakes raise :class:`ConfigError` naming the field (see dcmdp.config).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field and what is allowed."""


def coerce_value(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / command-line value to the field's declared type, or fail naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return coerce_value(name, value, others[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = (
                float(value) if hint is float else int(str(value), 0) if isinstance(value, str) else value
            )
        except (ValueError, TypeError):  # TypeError: null for a setting that cannot be null
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and (not isinstance(number, int) or isinstance(number, bool)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return float(number) if hint is float else number
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce_value(name, v, a) for v, a in zip(value, args, strict=True))
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [coerce_value(name, v, args[0]) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    loaded = yaml.safe_load(text)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}
