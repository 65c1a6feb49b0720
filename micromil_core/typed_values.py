"""One rule for turning a setting's value into its declared type, wherever it came from:
a YAML file, a ``--set section.key=value`` override, or a model param typed on the command
line (which arrives as a string).

Used by the experiment config (``config.build_section``) and the model registry
(``models.registry.params_from_dict``), so a value that one accepts the other accepts too,
and both refuse it with the same words.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from micromil_core.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}

_EXPECTED = {bool: "a bool: true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "bools", int: "integers", float: "numbers", str: "names"}


def _invalid(label: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{label}={value!r} is invalid: expected {expected}")


def _optional(typ: Any) -> Any | None:
    """X for ``X | None`` (or ``Optional[X]``), else None."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0]
    return None


def _scalar(label: str, typ: type, value: Any) -> Any:
    text = value.strip() if isinstance(value, str) else None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{label}: unsupported setting type {typ!r}")
    raise _invalid(label, value, _EXPECTED[typ])


def coerce(label: str, typ: Any, value: Any) -> Any:
    """``value`` as the type ``typ`` declares (bool, int, float, str, ``X | None``,
    ``tuple[X, ...]``, ``Mapping``), or a ``ConfigError`` naming ``label`` and the value.

    Strings are read as a person types them: "true"/"no", "5", "0.5", "64, 32",
    "{attn_dim: 64}". A mapping stays a dict of unconverted values for its own dataclass.
    """
    inner = _optional(typ)
    if inner is not None:
        return None if value is None else coerce(label, inner, value)
    origin = typing.get_origin(typ)
    if origin is Mapping or typ is Mapping:
        if isinstance(value, str):  # e.g. "{attn_dim: 64}" from a flat string config
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _invalid(label, value, "a mapping such as {attn_dim: 64}") from None
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _invalid(label, value, "a mapping of name: value")
        return dict(value)
    if origin is tuple:
        item = typing.get_args(typ)[0]
        items = value
        if isinstance(items, str):
            items = [v for v in (p.strip() for p in items.strip().strip("[]()").split(",")) if v]
        elif isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise _invalid(label, value, f"a comma-separated list of {_PLURAL[item]}")
        try:
            return tuple(_scalar(label, item, v) for v in items)
        except ConfigError:
            raise _invalid(label, value, f"a list of {_PLURAL[item]}") from None
    return _scalar(label, typ, value)


def hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (its annotations may be strings)."""
    return typing.get_type_hints(cls)


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """A dataclass's own check (``__post_init__``): ``ConfigError`` naming key, value and
    what is expected, in the same words as ``coerce``."""
    if not ok:
        raise _invalid(key, value, expected)
