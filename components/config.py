"""Strict loading of the typed step configs from plain dicts (params.yaml, KFP parameters).

Every step has one dataclass with a docstring under each field. `from_dict` builds one from a
mapping and refuses anything it does not understand: an unknown key (with a "did you mean"
hint), a value of the wrong type, a nested section that is not a mapping. The error names the
full dotted path of the offending key, so `filter.near_dup_treshold` in params.yaml is reported
as exactly that.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that the step configs do not accept."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, f"{where}.<key>"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # KFP passes dict parameters as protobuf Structs: every number is a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in a config class


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, strictly. Missing keys take the field defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without a default is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}" if where else str(err)) from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config, as written into manifests and KFP parameters."""
    return dataclasses.asdict(obj)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base`, recursively for nested mappings; neither is modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge(cls: type, base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base` for dataclass `cls`: sections that are dataclasses merge key by
    key, every other value (a mapping such as `source.fields` included) is replaced whole."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in override.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(tp, out[key], value)
        else:
            out[key] = value
    return out


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`; used by the configs' `check` methods."""
    if not condition:
        raise ConfigError(message)
