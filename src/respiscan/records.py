"""Typed JSON records: configuration dataclasses built from JSON with every key's type checked.

`build` turns a JSON value into the annotated type (dataclasses, Literal, X | None, list, dict, scalars),
naming the dotted key of the first problem, and returns the keys it did not know; `dump` writes it back with
those keys restored. `Record` gives a configuration dataclass `to_dict` / `from_dict` on top of them; the
bundle's config uses them directly, to keep unknown keys.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import MISSING, asdict, fields, is_dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from respiscan.errors import RespiscanError


class Invalid(Exception):
    """A problem at one key; from_dict prefixes the file name."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key!r} {problem}" if key else problem)


_NONE = type(None)
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false",
               list: "a list", dict: "an object"}


def describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _join(key: str, name: str | int) -> str:
    return f"{key}[{name}]" if isinstance(name, int) else f"{key}.{name}" if key else name


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def build(kind: Any, value: Any, key: str) -> tuple[Any, dict]:
    """`value` checked against the annotation `kind` (dataclasses, Literal, X | None, list, dict, scalars, Any);
    returns it converted (dataclasses built, ints as floats where floats are due) and the tree of keys unknown
    to the dataclasses on the way."""
    origin = get_origin(kind)
    if kind is Any:
        return value, {}
    if is_dataclass(kind):
        return _build_dataclass(kind, value, key)
    if origin is Literal:
        if isinstance(value, (dict, list)) or value not in get_args(kind):
            raise Invalid(key, f"is {value!r}; accepted: "
                                f"{', '.join(map(str, get_args(kind)))}")
        return value, {}
    if origin in (Union, types.UnionType):
        if value is None and _NONE in get_args(kind):
            return None, {}
        *others, last = [arg for arg in get_args(kind) if arg is not _NONE]
        for arm in others:
            try:
                return build(arm, value, key)
            except Invalid:
                pass
        return build(last, value, key)
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, list):
            raise Invalid(key, f"should be a list, got {describe(value)}")
        item = (get_args(kind) or (Any,))[0]  # list[X] and tuple[X, ...]
        built = [build(item, v, _join(key, i)) for i, v in enumerate(value)]
        items = [b for b, _ in built]
        return (tuple(items) if tuple in (origin, kind) else items), {i: u for i, (_, u) in enumerate(built) if u}
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise Invalid(key, f"should be an object, got {describe(value)}")
        names, items = get_args(kind) or (str, Any)
        out, unknown = {}, {}
        for name, v in value.items():
            if get_origin(names) is Literal and name not in get_args(names):
                raise Invalid(key, f"has an unknown key {name!r}; accepted: {', '.join(get_args(names))}")
            out[name], unknown[name] = build(items, v, _join(key, name))
        return out, {k: u for k, u in unknown.items() if u}
    ok = (isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok or (kind is float and not math.isfinite(value)):
        raise Invalid(key, f"should be {_TYPE_NAMES.get(kind, kind.__name__)}, got {describe(value)}")
    return (float(value) if kind is float else value), {}


def _build_dataclass(cls: type, value: Any, key: str) -> tuple[Any, dict]:
    if not isinstance(value, dict):
        raise Invalid(key, f"should be an object, got {describe(value)}")
    kwargs, unknown = {}, {}
    stored = [f for f in fields(cls) if f.init and f.metadata.get("json", True)]
    for f in stored:
        if f.name in value:
            kwargs[f.name], sub = build(_hints(cls)[f.name], value[f.name], _join(key, f.name))
            if sub:
                unknown[f.name] = sub
        elif f.default is MISSING and f.default_factory is MISSING:
            raise Invalid("", f"missing key {_join(key, f.name)!r}")
    names = {f.name for f in stored}
    unknown.update({k: v for k, v in value.items() if k not in names})
    try:
        return cls(**kwargs), unknown
    except (RespiscanError, TypeError, ValueError) as e:
        raise Invalid(key, f"is invalid: {e}") from e


def dump(value: Any, unknown: dict) -> Any:
    """JSON-ready value of `value`, with the unknown keys of the tree `_build` returned put back."""
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            omitted = (v is None and f.metadata.get("omit_none")) or (f.metadata.get("omit_default")
                                                                       and v == f.default)
            if f.metadata.get("json", True) and not omitted:
                out[f.name] = dump(v, unknown.get(f.name, {}))
        return {**out, **{k: v for k, v in unknown.items() if k not in {f.name for f in fields(value)}}}
    if isinstance(value, dict):
        return {k: dump(v, unknown.get(k, {})) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v, unknown.get(i, {})) for i, v in enumerate(value)]
    return value


class Record:
    """Mixin for configuration dataclasses stored as JSON: `to_dict()`, and `from_dict()`, which checks every
    key's type (nested Records included) and ignores keys it does not know (a newer version's additions)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict):
        try:
            return build(cls, d, "")[0]
        except Invalid as e:
            raise RespiscanError(f"{cls.__name__}: {e}") from None
