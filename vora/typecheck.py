"""Plain dataclasses checked against their type hints, with errors that name the file and the dotted key.

The recipe schema (:mod:`vora.config`) is written as dataclasses; :func:`build` fills one from a YAML mapping and
raises :class:`ConfigError` like ``configs/x.yaml: lora.rank: expected int, got a string ('8')`` or
``command line: train.learning_rat: unknown key (did you mean learning_rate?)``. Enough typing for recipes:
``Literal``, unions / ``None``, ``list[...]``, ``dict``, enums, nested dataclasses, bool/int/float/str. A dataclass
with a ``_shorthand`` field name also accepts a plain string for that field; ``_required`` lists keys that must be set.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe that cannot be used: the message names the file (or command line) and the dotted key."""


class Where:
    def __init__(self, source: str, overridden: set[str]):
        self.source = source
        self.overridden = overridden

    def where(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.overridden:
                return "command line"
        return self.source

    def error(self, dotted: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where(dotted)}: {dotted}: {msg}" if dotted else f"{self.source}: {msg}")


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class Mismatch(Exception):
    pass


def coerce(value, tp, ctx: Where, dotted: str):
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise Mismatch
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, ctx, dotted)
            except Mismatch:
                continue
            except ConfigError as e:  # a nested error is more precise than "expected X"
                errors.append(e)
        if errors:
            raise errors[0]
        raise Mismatch
    if value is None:
        raise Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise Mismatch
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise Mismatch
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check(v, item_tp, ctx, f"{dotted}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Mismatch
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if isinstance(value, str) and value in values:
            return value
        if isinstance(value, str):
            raise ctx.error(dotted, f"{value!r} is not one of {values}{suggest(value, values)}")
        raise Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and getattr(tp, "_shorthand", None):  # `- data.jsonl` for `- {path: data.jsonl}`
            return tp(**{tp._shorthand: value})
        if not isinstance(value, dict):
            raise Mismatch
        return build(tp, value, ctx, dotted)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e5 → 100000
        raise Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise Mismatch
    return value  # an annotation we do not model: accept


def check(value, tp, ctx: Where, dotted: str):
    try:
        return coerce(value, tp, ctx, dotted)
    except Mismatch:
        raise ctx.error(dotted, f"expected {type_name(tp)}, got {describe(value)}") from None


def describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def build(cls, raw: dict, ctx: Where, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ctx.error(dotted, f"unknown key{suggest(str(key), names)}")
        kwargs[key] = check(value, hints[key], ctx, dotted)
    for key in getattr(cls, "_required", ()):
        if kwargs.get(key) is None:
            raise ctx.error(f"{prefix}.{key}", "required key missing")
    return cls(**kwargs)
