"""Build typed dataclasses from parsed TOML, with messages that name the exact key.

Used for both the agent's config and each bundle's model.toml, so a typo in
either is reported the same way: ``models[1].gguf.n_ctx: expected an integer, got "big"``.
Only the handful of types our config needs are supported, on purpose.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class SchemaError(ValueError):
    """A value in a structured file does not match the expected type; `path` names the key."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except SchemaError:
                continue
        raise SchemaError(path, f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise SchemaError(path, f"expected {_describe(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SchemaError(path, f"expected {_describe(tp)}, got {value!r}")
        (item_tp, *_) = get_args(tp)
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SchemaError(path, f"expected a table, got {value!r}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SchemaError(path, f"expected a table, got {value!r}")
        return from_mapping(tp, value, path)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise SchemaError(path, f"expected {_describe(tp)}, got {value!r}")


def from_mapping(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise SchemaError(
            path,
            f"unknown key {where}{unknown[0]!s} (known: {', '.join(sorted(fields))})",
        )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(sub, "is required")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ range checks
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(path, str(exc)) from None
