"""One coercion rule for config sections and model params (micromil_core/typed_values.py)."""

from collections.abc import Mapping
from typing import Any

import pytest

from micromil_core.config import load_config
from micromil_core.errors import ConfigError
from micromil_core.models.registry import params_from_dict
from micromil_core.typed_values import coerce


@pytest.mark.parametrize("typ, value, expected", [
    (bool, "yes", True), (bool, "0", False), (int, "5", 5), (int, 4.0, 4), (float, "1e-3", 1e-3),
    (float, 2, 2.0), (str, "x", "x"), (int | None, None, None), (float | None, "0.5", 0.5),
    (tuple[int, ...], "64, 32", (64, 32)), (tuple[float, ...], 0.5, (0.5,)),
    (tuple[str, ...], ["a", "b"], ("a", "b")), (Mapping[str, Any], "{attn_dim: 64}", {"attn_dim": 64}),
    (Mapping[str, Any], None, {}),
])
def test_values_as_a_person_types_them(typ, value, expected):
    got = coerce("s.k", typ, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("typ, value, words", [
    (bool, "maybe", "true or false"), (int, 2.5, "an integer"), (int, True, "an integer"),
    (float, "fast", "a number"), (str, 3, "a string"), (tuple[int, ...], "1, x", "list of integers"),
    (Mapping[str, Any], [1], "mapping"),
])
def test_refusals_name_the_setting_and_the_value(typ, value, words):
    with pytest.raises(ConfigError, match=words) as err:
        coerce("train.epochs", typ, value)
    assert str(err.value).startswith(f"train.epochs={value!r} is invalid")


def test_config_and_model_params_accept_and_refuse_alike():
    # An int-valued float and a "true" string mean the same in a section and in a model's params.
    assert load_config(None, ["train.epochs=3.0"]).train.epochs == 3
    assert params_from_dict("micromil", {"n_clusters": 3.0}).n_clusters == 3
    for bad in (["train.epochs=2.5"], ["model.params.n_clusters=2.5"]):
        with pytest.raises(ConfigError, match="expected an integer"):
            cfg = load_config(None, ["model.name=micromil", *bad])
            params_from_dict(cfg.model.name, cfg.model.params)
