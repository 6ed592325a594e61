"""Declared parameters: one source for every default, its help text and its validation.

A frozen dataclass (a method, a config section) declares each parameter with :func:`param`; its
help text reaches ``--help`` and the recipe documentation, and :func:`check_params` validates the
values against the declaration, raising :class:`~fedmoe.errors.ParamError` that names the key.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from fedmoe.errors import ParamError, UsageError


def param(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with its help text and bounds (``ge`` ≤ value, ``gt`` <, ``le`` ≥, ``lt`` >)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    return dataclasses.field(default=default, metadata=meta)


def help_of(cls: type, name: str) -> str:
    """The declared help text of field ``name`` of ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


def default_of(cls: type, name: str) -> Any:
    """The declared default of field ``name`` of ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _type_name(kind: Any) -> str:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in kind)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, str(kind)
    )


def coerce(kind: Any, key: str, value: Any) -> Any:
    """``value`` as declared type ``kind`` (an int, float, bool, str or Enum), or a ParamError."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise ParamError(key, value, f"must be {_type_name(kind)}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
            raise ParamError(key, value, "must be a finite number")
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ParamError(key, value, f"must be {_type_name(kind)}")


def check_params(obj: Any) -> None:
    """Validate a frozen dataclass instance against its declared types and bounds (in place:
    values of an Enum or float field are normalised with ``object.__setattr__``)."""
    hints = _resolved_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind, optional = hints.get(f.name, (None, False))
        if kind is not None and not (optional and value is None):
            new = coerce(kind, f.name, value)
            if new is not value:
                object.__setattr__(obj, f.name, new)
                value = new
        meta = f.metadata
        for bound, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            b = meta.get(bound)
            if b is not None and isinstance(value, (int, float)) and not ok(value, b):
                raise ParamError(f.name, value, f"must be {word} {b:g}")


_TYPES: dict[type, dict[str, tuple[Any, bool]]] = {}


def _resolved_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name → (declared scalar type: int, float, bool, str or an Enum; whether None is
    allowed), cached per class."""
    if cls not in _TYPES:
        import typing

        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for name, hint in hints.items():
            args = typing.get_args(hint)
            if args and type(None) in args and len(args) == 2:  # X | None
                inner = next(a for a in args if a is not type(None))
                if _scalar(inner):
                    out[name] = (inner, True)
            elif _scalar(hint):
                out[name] = (hint, False)
        _TYPES[cls] = out
    return _TYPES[cls]


def _scalar(hint: Any) -> bool:
    return hint in (int, float, bool, str) or (
        isinstance(hint, type) and issubclass(hint, enum.Enum)
    )


def check_types(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against ``cls``'s declared field types (ParamError naming the key);
    numbers normalised (an int where a float is declared), enums parsed."""
    kinds = _resolved_types(cls)
    out = dict(values)
    for key, value in values.items():
        if key in kinds:
            kind, optional = kinds[key]
            if not (optional and value is None):
                out[key] = coerce(kind, key, value)
    return out


def from_mapping(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys (naming the nearest valid one)."""
    import difflib

    names = [f.name for f in dataclasses.fields(cls) if f.init]
    owner = getattr(cls, "name", cls.__name__)
    for key in data:
        if key not in names:
            match = difflib.get_close_matches(str(key), names, n=1)
            if match:
                near = f" (did you mean '{match[0]}'?)"
            elif names:
                near = f" (its parameters: {', '.join(names)})"
            else:
                near = " (it has no parameters)"
            raise UsageError(f"{where or owner}: unknown parameter '{key}'{near}")
    return cls(**data)


def params_dict(obj: Any) -> dict[str, Any]:
    """A parameter dataclass's values as plain JSON values (enums by value)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out
