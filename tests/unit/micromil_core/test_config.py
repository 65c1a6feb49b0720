from pathlib import Path

import pytest

from micromil_core.config import TrainConfig, apply_overrides, build_config, load_config
from micromil_core.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {name: gated-abmil, params: {attention_dim: 64}}\ntrain: {epochs: 7}\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.params.dropout=0.1", "data.encoder=pixels"])
    assert cfg.model.name == "gated-abmil"
    assert cfg.model.params == {"attention_dim": 64, "dropout": 0.1}
    assert cfg.train.epochs == 7
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string; we coerce
    assert cfg.data.encoder == "pixels"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.lrr.*valid keys of 'train': .*lr"):
        build_config({"train": {"lrr": 1}})


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section"):
        build_config({"optim": {}})


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.epochs=abc", "expected an integer"),
        ("train.epochs=0", "train.epochs=0 is invalid"),
        ("train.lr=-1", "positive"),
        ("train.device=tpu", "one of"),
        ("train.standardize=maybe", "true or false"),
        ("train.select_on=f1", "select_on"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("train.momentum=1.0", "train.momentum"),
        ("novalue", "section.key=value"),
        ("lr=1", "must name a section"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_do_not_mutate_input():
    raw = {"train": {"epochs": 3}}
    apply_overrides(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 3}}


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[3].joinpath("configs").rglob("*.yaml")), ids=str
)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)  # every shipped file parses into a validated config
    from micromil_core.models.registry import params_from_dict

    assert params_from_dict(cfg.model.name, cfg.model.params) is not None


def test_dp_config_is_a_private_federation():
    cfg = load_config(Path(__file__).parents[3] / "configs" / "sim-dp.yaml")
    assert cfg.privacy.mode == "dp-sgd" and cfg.privacy.target_epsilon == 8.0
    assert cfg.federation.scaler == "site"


def test_stain_normalise_is_a_flag_of_every_command_that_extracts_features():
    """`extract --stain-normalise` and `train/cv/simulate ... --encoder E --stain-normalise`
    say it the same way (it used to take --set data.stain_normalise=... beyond extract)."""
    from micromil_core.cli import build_parser
    from micromil_core.cli.options import experiment_config

    parser = build_parser()
    for command in (["train", "--data", "site", "--out", "o"], ["cv", "--data", "site", "--out", "o"]):
        args = parser.parse_args([*command, "--encoder", "histo-texture", "--stain-normalise", "macenko:ref.png"])
        assert experiment_config(args).data.stain_normalise == "macenko:ref.png"
    args = parser.parse_args(["train", "--data", "site", "--out", "o", "--encoder", "histo-texture",
                              "--stain-normalise", "sharpen:ref.png"])
    with pytest.raises(ConfigError, match="data.stain_normalise"):
        experiment_config(args)
    # Without an encoder there are no images to normalise: said, not silently ignored.
    args = parser.parse_args(["train", "--data", "site", "--out", "o", "--stain-normalise", "macenko:ref.png"])
    with pytest.raises(ConfigError, match="set together with an encoder"):
        experiment_config(args)
