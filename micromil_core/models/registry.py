"""Model registry: config name -> model class + frozen hyper-parameter dataclass.

Every model is rebuildable from ``(name, in_dim, n_classes, params dict)``; checkpoints
store exactly that (see :func:`model_config`), so ``evaluate`` needs nothing else.
Parameter values may arrive as strings from ``--set`` overrides; they are converted to
the dataclass field's type here, once, and validated by the dataclass itself. A
``Mapping`` field (a wrapper's ``base_params``) is taken as a plain dict here; its values
are converted by the dataclass, with the wrapped model's own :func:`params_from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from micromil_core.errors import ConfigError, unknown_name
from micromil_core.models.base import MILModel
from micromil_core.typed_values import coerce, hints

M = TypeVar("M", bound=type[MILModel])



@dataclass(frozen=True)
class RegisteredModel:
    """One registry entry, as listed by ``micromil models`` (not a buildable spec)."""

    name: str
    description: str
    params_cls: type
    defaults: dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    cls: type[MILModel]
    params_cls: type
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, params_cls: type, description: str) -> Callable[[M], M]:
    """Class decorator registering a ``MILModel`` under ``name``.

    The class's ``__init__`` must be ``(in_dim: int, n_classes: int, params: params_cls)``;
    ``params_cls`` must be a frozen dataclass whose fields all have defaults.
    """
    if not (dataclasses.is_dataclass(params_cls) and params_cls.__dataclass_params__.frozen):
        raise TypeError(f"params_cls of model {name!r} must be a frozen dataclass")

    def decorate(cls: M) -> M:
        old = _REGISTRY.get(name)
        if old is not None and old.cls is not cls:
            raise ValueError(f"model name {name!r} is already registered by {old.cls.__name__}")
        _REGISTRY[name] = _Entry(cls, params_cls, description)
        cls.model_name = name  # lets model_config() recover the registry name
        return cls

    return decorate


def model_names() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise unknown_name("model", name, list(_REGISTRY))
    return _REGISTRY[name]


def model_class(name: str) -> type[MILModel]:
    """The class registered under ``name`` (raises ``UnknownNameError`` listing the names)."""
    return _entry(name).cls


def model_specs() -> list[RegisteredModel]:
    """Every registered model with its description and default params, sorted by name."""
    return [
        RegisteredModel(n, e.description, e.params_cls, params_to_dict(e.params_cls()))
        for n, e in sorted(_REGISTRY.items())
    ]


def params_to_dict(params: Any) -> dict[str, Any]:
    """Plain (YAML/JSON friendly) dict of a params dataclass; tuples become lists."""
    out = dataclasses.asdict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def full_params(name: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``values`` validated and with every default filled in, as a plain dict: two
    spellings of the same model's params then compare equal."""
    return params_to_dict(params_from_dict(name, values))


def params_from_dict(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """Build model ``name``'s params dataclass from a (possibly partial) dict.

    Missing keys take their defaults; strings (from ``--set``) are converted to the field's
    type. Raises ``ConfigError`` on an unknown key (listing the valid ones) or a bad value.
    """
    entry = _entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.params_cls)}
    types = hints(entry.params_cls)
    kwargs: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in fields:
            raise ConfigError(
                f"model {name!r} has no param {key!r}; valid params: {', '.join(sorted(fields))}"
            )
        kwargs[key] = coerce(f"model {name!r}: param {key}", types[key], value)
    return entry.params_cls(**kwargs)


def load_model_code(name: str, in_dim: int, n_classes: int, params: Mapping[str, Any] | None = None) -> None:
    """Build model ``name`` once and drop it, so that what its layers import lazily (MicroMIL's
    PyG graph layer under ``gnn_backend: pyg``: seconds) is imported now, not in the first
    round that trains it. The global random state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        build_model(name, in_dim, max(n_classes, 2), params)


def build_model(
    name: str, in_dim: int, n_classes: int, params: Mapping[str, Any] | None = None
) -> MILModel:
    """Instantiate a registered model.

    ``params`` is a dict of hyper-parameters (values may be strings from the CLI); omitted
    keys take the defaults listed by :func:`model_specs`.
    """
    entry = _entry(name)
    for label, value, minimum in (("in_dim", in_dim, 1), ("n_classes", n_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"model {name!r}: {label}={value!r} must be an int >= {minimum}"
                + (" (binary tasks use 2 classes)" if label == "n_classes" else "")
            )
    return entry.cls(in_dim, n_classes, params_from_dict(name, params))


def model_config(model: MILModel) -> dict[str, Any]:
    """``{"name", "in_dim", "n_classes", "params"}``: ``build_model(**cfg)`` rebuilds it."""
    return {
        "name": type(model).model_name,
        "in_dim": model.in_dim,
        "n_classes": model.n_classes,
        "params": params_to_dict(model.params),
    }


# --- validation helpers for the params dataclasses' __post_init__ --------------------------


def check_int(model: str, key: str, value: int, minimum: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model {model!r}: param {key}={value!r} must be an int >= {minimum}")


def check_float(
    model: str, key: str, value: float, low: float, high: float, high_inclusive: bool = True
) -> None:
    """Raise ``ConfigError`` unless ``low <= value <= high`` (or ``< high``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(
            f"model {model!r}: param {key}={value!r} must be a number in [{low}, {high}{bracket}"
        )


def check_choice(model: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"model {model!r}: param {key}={value!r} is not one of {', '.join(choices)}"
        )
