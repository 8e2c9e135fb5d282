"""Typed dataclass configs loaded from YAML, with `a.b=value` overrides (the OLMo-core style).

Every room defines its configs as plain dataclasses with an optional `validate()` method; this module turns
nested dicts into them strictly: an unknown key, a wrong type or an impossible value is a `ConfigError` that
names the dotted key and the file it came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from fuxi.common.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str, source: str | None) -> Any:
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "may not be null", source)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"{value!r} matches none of {args}", source)
    if origin is typing.Literal:
        allowed = get_args(annotation)
        if not is_choice(value, allowed):
            raise ConfigError(key, f"{value!r} is not one of {list(allowed)}", source)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}", source)
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}", source)
        _, val_type = get_args(annotation) or (str, Any)
        return {str(k): _coerce(v, val_type, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping for {annotation.__name__}, got {value!r}", source)
        return from_dict(annotation, value, source=source, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true/false, got {value!r}", source)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}", source)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}", source)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}", source)
    return value


def from_dict(cls: type[T], data: dict, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, recursively, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", "expected a mapping", source)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        others = f" (and {', '.join(prefix + k for k in unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(prefix + unknown[0], f"unknown key{others}; known: {sorted(fields)}", source)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        others = f" (and {', '.join(prefix + m for m in missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(prefix + missing[0], f"missing{others}", source)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:  # keyed by the field of `cls`: seen from here, prefix + field
            raise err.under(prefix).within(source) from None
    return obj


def is_choice(value: Any, allowed) -> bool:
    """`value` is one of `allowed`, with its type: YAML's `true` is not the choice 1 (`True == 1` in Python)."""
    return any(value == choice and type(value) is type(choice) for choice in allowed)


def require_choice(key: str, value: Any, choices: Any) -> None:
    """The check of a choice that is a function argument, not a config field (`impl=`, `form=`): a ConfigError
    naming `key` unless `value` is one of `choices` (a Literal type, or a sequence of values)."""
    allowed = get_args(choices) if get_origin(choices) is typing.Literal else tuple(choices)
    if not is_choice(value, allowed):
        raise ConfigError(key, f"{value!r} is not one of {list(allowed)}")


def check_choices(obj: Any) -> None:
    """The validate() check of every `Literal[...]` field of dataclass `obj`: from_dict checks them when a config
    is loaded, this also when one is built in code (`ModelConfig(kernels="tritn")`). Choice fields are declared
    once, as Literals; a field's allowed values are `typing.get_args` of its annotation."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        annotation, value = hints[f.name], getattr(obj, f.name)
        options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
        literals = [a for a in options if get_origin(a) is typing.Literal]
        if not literals or (value is None and type(None) in options):
            continue
        allowed = [v for literal in literals for v in get_args(literal)]
        if not is_choice(value, allowed):
            raise ConfigError(f.name, f"{value!r} is not one of {allowed}")


def require_at_least(obj: Any, minimum: float, *names: str) -> None:
    """The validate() check of numeric fields with a lower bound: a ConfigError naming the first field of `obj`
    below `minimum` (None, for an optional field, passes)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value}")


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts/lists, ready for YAML or JSON (fields with init=False, which
    from_dict does not read, are left out)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as YAML, so `3`, `true`, `[1, 2]` and `null` work)."""
    if "=" not in item:
        raise ConfigError("", f"override {item!r}: expected key=value, e.g. model.num_layers=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("", f"override {item!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Set dotted keys in a nested dict (creating sub-mappings as needed). Type checks happen in from_dict."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1], 1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[:depth]), f"override {item!r}: not a mapping")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError("", f"not valid YAML: {err}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping", str(path))
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> T:
    """Load `cls` from a YAML file (or a dict), then apply `--set` overrides, then validate."""
    source = str(path) if path is not None else "<dict>"
    base = read_yaml(path) if path is not None else dict(data or {})
    if overrides:
        source += " with --set " + " ".join(overrides)
    return from_dict(cls, apply_overrides(base, overrides), source=source)
