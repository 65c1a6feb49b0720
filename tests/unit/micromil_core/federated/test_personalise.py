"""A training site's personal model (federated/personalise.py), without Flower: the head a
site keeps, its store, selection on validation patients only, the small-count guard and
DP-SGD's ledger."""

import math
from dataclasses import replace

import pytest
import torch

from micromil_core.config import DataConfig, LocalPrivacyConfig, TrainConfig, build_config
from micromil_core.errors import ConfigError, SiteDataError
from micromil_core.federated import personalise, wire
from micromil_core.federated.messages import RoundSettings
from micromil_core.federated.personalise import (
    PersonalStore,
    head_keys,
    keep_local_head,
    make_personal_model,
    only_head_trains,
    personalise_site,
    planned_rounds,
)
from micromil_core.federated.site_task import ModelSpec, SiteSettings, load_runtime
from micromil_core.models.base import MILModel
from micromil_core.models.registry import build_model
from micromil_core.privacy.disclosure import withheld_names
from micromil_core.privacy.ledger import PrivacyLedger
from micromil_core.training.checkpoint import load_checkpoint
from tests.conftest import write_site

SPEC = ModelSpec("abmil", 6, 2, {})
CLASSES = ["benign", "malignant"]


def _cfg(method="finetune", folds=5, **train):
    return build_config({
        "model": {"name": "abmil"},
        "train": {"lr": 1e-2, "seed": 1, "patience": 0, **train},
        "federation": {"rounds": 2, "personalise": method, "personal_epochs": 3, "personal_folds": folds},
        "privacy": {"min_patients": 2, "allow_small_counts": True},
    })


def _runtime(tmp_path, n=24, privacy=None, seed=0):
    site = SiteSettings("h1", write_site(tmp_path / "h1", n_patients=n, splits=True, seed=seed),
                        privacy=privacy or LocalPrivacyConfig(), state_dir=tmp_path / "state")
    return load_runtime(site, DataConfig(), TrainConfig(), CLASSES)


@pytest.mark.parametrize("name, params, heads", [
    ("abmil", {}, {"head.weight", "head.bias"}),
    ("micromil", {"n_clusters": 4, "top_k": 2}, {"head.weight", "head.bias"}),
    ("dsmil", {}, {"bag_head.weight", "bag_head.bias", "instance_head.weight", "instance_head.bias"}),
    ("transmil", {}, {"head.weight", "head.bias"}),
    ("clam-sb", {}, {"head.weight", "head.bias"}),
    ("mhim", {"base": "abmil"}, {"student.head.weight", "student.head.bias"}),
])
def test_head_keys_name_the_classifier_only(name, params, heads):
    model = build_model(name, 6, 2, params)
    assert set(head_keys(model)) == heads
    assert len(head_keys(model)) < len(model.state_dict())


def test_a_model_without_a_named_head_is_refused():
    class Headless(MILModel):
        head_modules = ("nothing",)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="names no classifier head"):
        head_keys(Headless())


def test_only_the_head_moves(tmp_path):
    runtime = _runtime(tmp_path)
    model = SPEC.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    personalise.train_local_head(model, runtime.train, [], TrainConfig(lr=1e-1), 2, torch.device("cpu"), (0.5, 1.0))
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(head_keys(model))
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    with only_head_trains(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head_keys(model))


def test_hmil_learns_its_coarse_head_when_personalised():
    """Fine-tuning runs at the last round's progress, not at 1.0 where HMIL's curriculum
    switches the coarse loss off (its coarse scorer would then only decay)."""
    from micromil_core.data.bag import Bag

    model = build_model("hmil", 6, 2, {"fine_to_coarse": [0, 0, 1, 1], "embed_dims": [8], "fine_dim": 8,
                                       "attn_dim": 8})
    gen = torch.Generator().manual_seed(0)
    bags = [Bag(f"p{i}", torch.randn(5, 6, generator=gen) + (i % 2), i % 2, fine_label=(i % 2) * 2 + (i // 2) % 2)
            for i in range(12)]
    before = model.state_dict()["coarse_score.weight"].clone()
    cfg = _cfg("local-head")
    personalise.train_local_head(model, bags, [], replace(cfg.train, weight_decay=0.0), 2,
                                 torch.device("cpu"), personalise.last_round_span(cfg))
    assert not torch.equal(model.state_dict()["coarse_score.weight"], before)


def test_store_keeps_the_newest_head_before_each_round(tmp_path):
    store = PersonalStore(tmp_path, "run/1", "h1")
    assert store.root == tmp_path / "personal" / "run_1"  # the id cannot leave the folder
    assert store.head_before(1) is None
    for r in (1, 2, 3):
        store.save_head(r, {"head.bias": torch.full((2,), float(r))})
    assert sorted(p.name for p in store.root.glob("head-*")) == ["head-round-0002.pt", "head-round-0003.pt"]
    assert store.head_before(3)["head.bias"][0] == 2.0  # a replayed round 3 starts from round 2's
    assert store.head_before(9)["head.bias"][0] == 3.0
    # A site that sat out round 5 keeps round 3's head for a replay of round 6.
    store.save_head(6, {"head.bias": torch.full((2,), 6.0)})
    assert store.head_before(6)["head.bias"][0] == 3.0
    with pytest.raises(SiteDataError, match="state_dir"):
        PersonalStore(None, "r", "h1")


def test_local_head_continues_from_the_kept_head(tmp_path):
    runtime = _runtime(tmp_path)
    cfg = _cfg("local-head")
    trained = SPEC.build().state_dict()
    cpu = torch.device("cpu")
    keep_local_head(runtime, SPEC, trained, cfg, None, 1, 1, cpu, "run")
    store = PersonalStore(runtime.settings.state_dir, "run", "h1")
    first = store.head_before(2)
    assert set(first) == {"head.weight", "head.bias"}
    assert not torch.equal(first["head.weight"], trained["head.weight"])
    keep_local_head(runtime, SPEC, trained, cfg, None, 2, 1, cpu, "run")
    # Round 2 of a site with no kept head (another run) ends elsewhere: the kept one was used.
    keep_local_head(runtime, SPEC, trained, cfg, None, 2, 1, cpu, "other")
    kept, fresh = store.head_before(3), PersonalStore(runtime.settings.state_dir, "other", "h1").head_before(3)
    assert not torch.equal(kept["head.weight"], fresh["head.weight"])


@pytest.mark.parametrize("folds", [5, 0])
def test_selection_never_reads_test_patients(tmp_path, monkeypatch, folds):
    """The choice reads the site's training + validation patients (k-fold CV, fine-tuning
    methods) or its validation patients only (``personal_folds: 0``, and local-head always);
    poisoned test patients change nothing."""
    runtime = _runtime(tmp_path)
    test_ids = {id(b) for b in runtime.test}
    assert test_ids and runtime.val
    seen = []
    from micromil_core.training import trainer

    real_predict = trainer.predict_bags

    def spying(model, bags, *a, **kw):
        seen.append({id(b) for b in bags})
        return real_predict(model, bags, *a, **kw)

    monkeypatch.setattr(trainer, "predict_bags", spying)
    state = SPEC.build().state_dict()
    methods = ("finetune", "proximal", "local-head")
    val_ids, train_ids = {id(b) for b in runtime.val}, {id(b) for b in runtime.train}
    clean = []
    for m in methods:
        seen.clear()
        clean.append(personalise_site(runtime, SPEC, state, _cfg(m, folds), None, torch.device("cpu"), "run", 2))
        assert seen and all(not (ids & test_ids) for ids in seen)
        cv = folds and m != "local-head"
        assert all(ids <= (val_ids | train_ids if cv else val_ids) for ids in seen), m
        if cv:  # every training and validation patient was held out once
            assert set().union(*seen) == val_ids | train_ids
            assert clean[-1][2]["personal_folds"] >= 2
            assert clean[-1][2]["num_val"] == len(runtime.train) + len(runtime.val)
        else:
            assert "personal_folds" not in clean[-1][2] and clean[-1][2]["num_val"] == len(runtime.val)
    for b in runtime.test:
        b.features.fill_(float("nan"))
    for method, (model, epoch, _) in zip(methods, clean, strict=True):
        again, epoch_again, _ = personalise_site(runtime, SPEC, state, _cfg(method, folds), None,
                                                 torch.device("cpu"), "run", 2)
        assert epoch_again == epoch
        assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items()), method


@pytest.mark.parametrize("folds", [5, 0])
def test_the_global_model_is_kept_when_nothing_beats_it(tmp_path, monkeypatch, folds):
    from types import SimpleNamespace

    from micromil_core.federated.personal_cv import score_on
    from micromil_core.training import trainer

    runtime = _runtime(tmp_path)
    torch.manual_seed(0)  # the global model's weights: the same whatever ran before
    state = SPEC.build().state_dict()

    def unchanged(model, train, val, cfg, device, epochs=None, **_):
        """A fine-tuning that leaves the weights as they were, claiming epoch 2: every epoch
        scores exactly what the global model scores."""
        entry = SimpleNamespace(val_metrics=score_on(cfg, model, train, val, device)[1])
        return SimpleNamespace(best_epoch=2, history=[entry] * (epochs or 1))

    with monkeypatch.context() as m:
        m.setattr(trainer, "fit", unchanged)
        model, epoch, metrics = personalise_site(runtime, SPEC, state, _cfg(folds=folds), None,
                                                 torch.device("cpu"), "run", 1)
    assert epoch == 0 and metrics["personal_epoch"] == 0  # a tie keeps the global model
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert metrics["val_auc_personal"] == metrics["val_auc_global"]
    # A learnable task: fine-tuning beats the untrained global model.
    model, epoch, metrics = personalise_site(runtime, SPEC, state, _cfg(folds=folds, lr=3e-3), None,
                                             torch.device("cpu"), "run", 1)
    assert 1 <= epoch <= 3 and metrics["personal_epoch"] == epoch
    assert metrics["val_auc_personal"] > metrics["val_auc_global"]
    assert not all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_too_few_patients_of_a_class_withhold_the_personal_numbers(tmp_path):
    runtime = _runtime(tmp_path)
    pool = [b.label for b in runtime.train + runtime.val]
    smaller = min(pool.count(0), pool.count(1))
    assert len(pool) >= smaller + 1  # enough patients in all, too few of one class
    _, _, metrics = personalise_site(runtime, SPEC, SPEC.build().state_dict(), _cfg(), None,
                                     torch.device("cpu"), "run", min_patients=smaller + 1)
    assert set(metrics) <= wire.ALLOWED_PERSONAL_METRICS
    assert not {"val_auc_global", "val_auc_personal", "personal_epoch", "personal_folds"} & set(metrics)
    # The folds too: fewer than asked would be the smaller class's patient count.
    assert set(withheld_names(metrics[wire.SUPPRESSED])) >= {"val_auc_global", "personal_epoch",
                                                             "personal_folds"}


def test_a_diverged_fold_never_wins_the_cv_choice(monkeypatch):
    """A fine-tuning whose held-fold score is NaN in one fold (a diverged run) never has its
    epoch count chosen, however good the other folds look; the refit replays the chosen
    epochs' part of the training span, as the folds ran it."""
    from types import SimpleNamespace

    from micromil_core.data.bag import Bag
    from micromil_core.federated import personal_cv
    from micromil_core.training import trainer

    gen = torch.Generator().manual_seed(0)
    pool = [Bag(f"p{i}", torch.randn(4, 6, generator=gen), i % 2) for i in range(12)]
    calls = []

    def scripted(model, train, val, cfg, device, epochs=None, progress_span=None, **_):
        calls.append((epochs, progress_span))
        fold = len(calls) - 1
        # epoch 1: great everywhere but NaN in fold 0; epoch 2: fine everywhere
        losses = [math.nan if fold == 0 else 0.01, 0.3]
        return SimpleNamespace(history=[SimpleNamespace(val_metrics={"loss": v, "auc": 0.9})
                                        for v in losses[:epochs]])

    monkeypatch.setattr(trainer, "fit", scripted)
    monkeypatch.setattr(personal_cv, "score_on", lambda *a: (-0.5, {"loss": 0.5, "auc": 0.5}))
    choice = personal_cv.cv_fine_tuning(lambda: SPEC.build(), pool, TrainConfig(), 2, 3,
                                        torch.device("cpu"), (0.5, 1.0))
    assert choice.epoch == 2 and choice.model is not None
    assert calls[:3] == [(2, (0.5, 1.0))] * 3 and calls[3] == (2, (0.5, 1.0))
    # Chosen at epoch 1 of 2 (the NaN fold removed), the refit covers the span's first half.
    monkeypatch.setattr(trainer, "fit", lambda *a, epochs=None, progress_span=None, **k: (
        calls.append((epochs, progress_span)) or SimpleNamespace(history=[
            SimpleNamespace(val_metrics={"loss": 0.01, "auc": 0.9}),
            SimpleNamespace(val_metrics={"loss": 0.3, "auc": 0.9})][:epochs])))
    calls.clear()
    assert personal_cv.cv_fine_tuning(lambda: SPEC.build(), pool, TrainConfig(), 2, 3,
                                      torch.device("cpu"), (0.5, 1.0)).epoch == 1
    assert calls[-1] == (1, (0.5, 0.75))


def test_one_se_rule_changes_model_only_for_a_gain_above_the_folds_noise():
    import numpy as np

    from micromil_core.federated.personal_cv import chosen_epoch

    # Columns: the global model, then fine-tuning epochs 1..3; rows: held folds.
    noisy = np.array([[0.70, 0.90, 0.60, 0.70],
                      [0.80, 0.60, 0.95, 0.80],
                      [0.60, 0.75, 0.72, 0.65]])  # epoch 2 best on average, by less than its noise
    assert chosen_epoch(noisy, "best") == 2
    assert chosen_epoch(noisy, "one-se") == 0
    steady = np.array([[0.70, 0.80, 0.85, 0.86],
                       [0.60, 0.72, 0.74, 0.73],
                       [0.65, 0.74, 0.80, 0.81]])  # every fold gains: switch, at the fewest epochs near the best
    assert chosen_epoch(steady, "best") == 3
    assert chosen_epoch(steady, "one-se") == 2
    # A column with a non-finite fold never wins, under either rule.
    diverged = steady.copy()
    diverged[0, 2] = np.nan
    assert chosen_epoch(diverged, "best") == 3 and chosen_epoch(diverged, "one-se") == 3
    # Ties keep the global model.
    assert chosen_epoch(np.full((3, 4), 0.7), "one-se") == chosen_epoch(np.full((3, 4), 0.7), "best") == 0
    with pytest.raises(ConfigError, match="federation.personal_rule"):
        build_config({"federation": {"personal_rule": "median"}})


def test_the_personal_model_is_a_checkpoint_at_the_site(tmp_path):
    runtime = _runtime(tmp_path)
    cfg = _cfg(folds=0)  # chosen on the validation split
    settings = RoundSettings(cfg, CLASSES, SPEC)
    global_state = SPEC.build().state_dict()
    metrics = make_personal_model(runtime, settings, global_state, torch.device("cpu"), "run-7", 2)
    ckpt_path = tmp_path / "state" / "personal" / "run-7" / "model.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.provenance["personalised"] == "finetune" and ckpt.provenance["site"] == "h1"
    assert ckpt.classes == CLASSES and isinstance(ckpt.provenance["personal_epoch"], int)
    assert "personal_epoch" not in metrics  # one validation patient of a class: withheld
    assert ckpt.provenance["scaler"] == "global"
    # Asked again with the same global model (a coordinator restarted mid-step), the site
    # answers with what it made, without training (or spending DP budget) again.
    stamp = ckpt_path.stat().st_mtime_ns
    again = make_personal_model(runtime, settings, global_state, torch.device("cpu"), "run-7", 2)
    assert again == metrics and ckpt_path.stat().st_mtime_ns == stamp
    other = SPEC.build()
    other.head.bias.data += 1.0
    make_personal_model(runtime, settings, other.state_dict(), torch.device("cpu"), "run-7", 2)
    assert ckpt_path.stat().st_mtime_ns != stamp  # another global model: made afresh
    stamp = ckpt_path.stat().st_mtime_ns
    by_cv = RoundSettings(_cfg(folds=3), CLASSES, SPEC)
    made = make_personal_model(runtime, by_cv, other.state_dict(), torch.device("cpu"), "run-7", 2)
    assert ckpt_path.stat().st_mtime_ns != stamp and made["personal_folds"] == 3  # made another way
    held_out = replace(runtime, settings=replace(runtime.settings, role="holdout"))
    with pytest.raises(SiteDataError, match="held-out"):
        make_personal_model(held_out, settings, other.state_dict(), torch.device("cpu"), "run-7", 2)


def test_dp_fine_tuning_is_one_more_round_in_the_ledger(tmp_path):
    privacy = LocalPrivacyConfig(mode="dp-sgd", target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    runtime = _runtime(tmp_path, n=40, privacy=privacy)
    cfg = _cfg("proximal")
    assert planned_rounds(cfg) == 3 and planned_rounds(_cfg("local-head")) == 2
    _, epoch, metrics = personalise_site(runtime, SPEC, SPEC.build().state_dict(), cfg, None,
                                         torch.device("cpu"), "run", 2)
    ledger = PrivacyLedger(tmp_path / "state")
    rounds = ledger.runs["run"].rounds
    assert [r["round"] for r in rounds] == [3]  # after the 2 federation rounds
    assert metrics["epsilon"] == pytest.approx(rounds[-1]["epsilon"])
    assert metrics["epsilon"] <= 8.0 and "train_loss" not in metrics
    assert set(metrics) <= wire.ALLOWED_PERSONAL_METRICS
    with pytest.raises(ConfigError, match="local-head"):
        personalise_site(runtime, SPEC, SPEC.build().state_dict(), _cfg("local-head"), None,
                         torch.device("cpu"), "run", 2)


def test_config_checks_the_method():
    with pytest.raises(ConfigError, match="federation.personalise"):
        build_config({"federation": {"personalise": "ditto-ish"}})
    with pytest.raises(ConfigError, match="personal_epochs"):
        build_config({"federation": {"personalise": "finetune", "personal_epochs": 0}})
    cfg = replace(_cfg(), federation=replace(_cfg().federation, personal_mu=0.5))
    assert cfg.federation.personal_mu == 0.5 and not math.isnan(cfg.federation.personal_mu)


def test_flower_client_personalise_makes_the_sites_model_from_a_released_one(tmp_path, capsys):
    import yaml

    from client.cli import main as flower_client
    from micromil_core.cli import main as micromil

    site = write_site(tmp_path / "h1", n_patients=24, splits=True)
    assert micromil(["train", "--data", str(site), "--model", "abmil", "--epochs", "2",
                     "--out", str(tmp_path / "global")]) == 0
    for name in ("ca.pem", "h1.key"):
        (tmp_path / name).write_text("")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({
        "site": {"name": "h1", "data_path": str(site), "role": "train"},
        "superlink": {"address": "coord.example.org:9092", "ca_cert": "ca.pem", "private_key": "h1.key"},
        "supernode": {"state_dir": "state"},
    }))
    runs = []
    for out in ("a.pt", "b.pt"):
        assert flower_client(["personalise", "--config", str(tmp_path / "site.yaml"), "--model",
                              str(tmp_path / "global" / "model.pt"), "--out", str(tmp_path / out),
                              "--set", "federation.personal_epochs=3"]) == 0
        runs.append(load_checkpoint(tmp_path / out))
    assert "personal model:" in capsys.readouterr().out
    a, b = runs
    assert a.provenance["personalised"] == "finetune" and a.provenance["site"] == "h1"
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)  # reproducible
    assert not list((tmp_path / "global").glob("personal*"))  # the released model is untouched


def test_cv_folds_keep_every_class_in_every_held_fold():
    from micromil_core.federated.personal_cv import usable_folds

    assert usable_folds([0] * 10 + [1] * 10, 5) == 5
    assert usable_folds([0] * 10 + [1] * 3, 5) == 3  # the smaller class sets the count
    assert usable_folds([0] * 10 + [1], 5) == 0  # one patient of a class: no CV
    assert usable_folds([0] * 10, 5) == 0  # one class: no AUC to choose by
    assert usable_folds([0] * 10 + [1] * 10, 0) == 0  # asked for none


def test_cv_never_scores_a_fold_model_on_its_own_training_patients(tmp_path, monkeypatch):
    """Each fold's model trains on the other folds only; the personal model is then trained
    on all training + validation patients for the chosen epoch count, with nothing held."""
    from micromil_core.training import trainer

    runtime = _runtime(tmp_path)
    calls = []
    real_fit = trainer.fit

    def spying(model, train, val, cfg, device, **kw):
        calls.append(({id(b) for b in train}, {id(b) for b in val}, kw.get("epochs")))
        return real_fit(model, train, val, cfg, device, **kw)

    monkeypatch.setattr(trainer, "fit", spying)
    _, epoch, metrics = personalise_site(runtime, SPEC, SPEC.build().state_dict(), _cfg(lr=3e-3), None,
                                         torch.device("cpu"), "run", 1)
    pool = {id(b) for b in runtime.train + runtime.val}
    folds = metrics["personal_folds"]
    assert all(not (train & val) and train | val == pool and n == 3 for train, val, n in calls[:folds])
    assert set().union(*(val for _, val, _ in calls[:folds])) == pool
    assert epoch >= 1 and calls[folds:] == [(pool, set(), epoch)]
