"""``federation.initial_model``: round 1 starts from a given model.pt (e.g. trained on a
public cohort), and only when it is the same model with the same classes."""

import pytest
import torch

from micromil_core.config import build_config
from micromil_core.errors import ConfigError
from micromil_core.federated.setup import experiment_spec, initial_model_state, starting_weights
from micromil_core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

CLASSES = ["negative", "positive"]
MODEL = {"name": "abmil", "params": {"embed_dims": [8], "attn_dim": 4}}


def _cfg(initial_model: str = "", model: dict = MODEL):
    return build_config({"model": model, "train": {"seed": 3},
                         "federation": {"initial_model": initial_model}})


def _save(path, model: dict = MODEL, classes=CLASSES, dim: int = 6) -> dict:
    spec = experiment_spec(_cfg(model=model), dim, classes)
    torch.manual_seed(123)
    state = spec.build().state_dict()  # weights unlike the seeded init
    # A checkpoint written with only the non-default params still matches.
    save_checkpoint(Checkpoint(spec.name, dim, len(classes), dict(model["params"]), list(classes),
                               state), path)
    return state


def test_without_a_file_round_one_is_the_seeded_init() -> None:
    cfg = _cfg()
    spec = experiment_spec(cfg, 6, CLASSES)
    start = starting_weights(cfg, spec, CLASSES)
    seeded = initial_model_state(spec, 3)
    assert all(torch.equal(start[k], seeded[k]) for k in seeded)


def test_round_one_starts_from_the_given_checkpoint(tmp_path) -> None:
    saved = _save(tmp_path / "public.pt")
    cfg = _cfg(str(tmp_path / "public.pt"))
    start = starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    seeded = initial_model_state(experiment_spec(cfg, 6, CLASSES), 3)
    assert any(not torch.equal(start[k], seeded[k]) for k in seeded)


@pytest.mark.parametrize(
    ("saved", "needle"),
    [
        ({"model": {"name": "abmil", "params": {"embed_dims": [16], "attn_dim": 4}}}, "model params"),
        ({"model": {"name": "gated-abmil", "params": MODEL["params"]}}, "model 'gated-abmil'"),
        ({"classes": ["positive", "negative"]}, "classes"),
        ({"dim": 7}, "feature dim"),
    ],
)
def test_a_different_model_or_class_order_is_refused(tmp_path, saved, needle) -> None:
    path = tmp_path / "other.pt"
    _save(path, **saved)
    cfg = _cfg(str(path))
    with pytest.raises(ConfigError) as err:
        starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "federation.initial_model" in msg


def test_a_missing_file_names_the_key(tmp_path) -> None:
    cfg = _cfg(str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match=r"federation.initial_model: .*nope.pt not found"):
        starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)


def test_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    path = tmp_path / "odd.pt"
    _save(path)
    ckpt = load_checkpoint(path)
    ckpt.state_dict["head.weight"] = torch.zeros(3, 3)  # same params, damaged weights
    save_checkpoint(ckpt, path)
    cfg = _cfg(str(path))
    with pytest.raises(ConfigError, match="do not fit this model.*head.weight"):
        starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)


def test_a_base_model_checkpoint_starts_an_mhim_federation(tmp_path) -> None:
    # The paper's protocol in a federation: MHIM starts from a converged base model.
    saved = _save(tmp_path / "abmil.pt")
    mhim = {"name": "mhim", "params": {"base": "abmil", "base_params": MODEL["params"],
                                       "teacher_init": "converged"}}
    cfg = _cfg(str(tmp_path / "abmil.pt"), model=mhim)
    start = starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)
    assert start.keys() == {f"student.{k}" for k in saved}
    assert all(torch.equal(start[f"student.{k}"], v) for k, v in saved.items())
    other = {**mhim, "params": {**mhim["params"], "base_params": {"embed_dims": [16], "attn_dim": 4}}}
    cfg = _cfg(str(tmp_path / "abmil.pt"), model=other)
    with pytest.raises(ConfigError, match="its model 'abmil' differ from this federation's 'mhim'"):
        starting_weights(cfg, experiment_spec(cfg, 6, CLASSES), CLASSES)
