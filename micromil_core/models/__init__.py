"""MIL models of micromil-fl behind one contract (``base.MILModel``) and one registry.

Importing this package registers every model; build one with
``build_model(name, in_dim, n_classes, params)`` and list them with ``model_specs()``.
"""

from micromil_core.models import (  # noqa: F401  (importing registers the models)
    abmil,
    clam,
    dsmil,
    hmil,
    mhim,
    micromil,
    mran,
    pooling,
    transmil,
)
from micromil_core.models.base import MILModel, Prediction
from micromil_core.models.registry import (
    RegisteredModel,
    build_model,
    model_config,
    model_names,
    model_specs,
    params_from_dict,
    params_to_dict,
    register_model,
)
from micromil_core.nn import masked_softmax

__all__ = [
    "MILModel",
    "RegisteredModel",
    "Prediction",
    "build_model",
    "masked_softmax",
    "model_config",
    "model_names",
    "model_specs",
    "params_from_dict",
    "params_to_dict",
    "register_model",
]
