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

from components.errors import ParameterError, excerpt

T = TypeVar("T")

MAX_YAML_BYTES = 1 << 20
"""Largest parameters file (or `--set` value) read; the repository's params.yaml is ~20 KB."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in parameters."""
MAX_ITEMS = 10_000
"""Most entries of one mapping or list in parameters."""
MAX_STRING = 4096
"""Longest text value (or key) in parameters."""


class ConfigError(ParameterError, ValueError):
    """A configuration value or key that the step configs do not accept."""


def load_yaml(text: str, where: str) -> Any:
    """YAML parameters, read within bounds: at most MAX_YAML_BYTES, no aliases (`*name` repeats a
    node; nested, a few lines expand to billions of entries), at most MAX_DEPTH levels, MAX_ITEMS
    entries per mapping or list and MAX_STRING characters per text value; only YAML's plain
    types (safe_load's). Anything else is a ConfigError naming `where` and the line."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters; parameters are at most {MAX_YAML_BYTES:,}")

    class Bounded(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(f"{where}: line {mark.line + 1}: YAML aliases (*name) are not accepted in "
                                  f"parameters; write the value out")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{where}: line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_STRING:
                raise ConfigError(f"{where}: line {node.start_mark.line + 1}: a value of {len(node.value):,} "
                                  f"characters; at most {MAX_STRING:,}")
            if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and len(node.value) > MAX_ITEMS:
                raise ConfigError(f"{where}: line {node.start_mark.line + 1}: {len(node.value):,} entries; "
                                  f"at most {MAX_ITEMS:,}")
            if isinstance(node, yaml.MappingNode):
                seen: set[str] = set()
                for key, _ in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value in seen:
                        raise ConfigError(f"{where}: line {key.start_mark.line + 1}: key {excerpt(key.value)} "
                                          f"appears twice in one mapping")
                    seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
            return node

    try:
        return yaml.load(text, Loader=Bounded)  # noqa: S506 - a SafeLoader
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {at}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(err).split())[:200]}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ConfigError(f"{where}: {str(err)[:200]}") from None


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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {excerpt(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {excerpt(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {excerpt(value)}")
        return {_coerce(k, key_tp, f"{where}.<key>"): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {excerpt(value)}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # KFP passes dict parameters as protobuf Structs: every number is a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {excerpt(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {excerpt(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {excerpt(value)}")
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
        name = str(key) if len(str(key)) <= 64 else str(key)[:64] + "..."
        path = f"{where}.{name}" if where else name
        if key not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
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
