"""MHIM-MIL wrapper: the teacher outside the state, EMA, masking, schedules, consistency,
inference by the student alone, config round trips, training through the trainer and DP-SGD
(tiny seeded data: logic only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from micromil_core.config import TrainConfig, load_config
from micromil_core.data.bag import Bag
from micromil_core.errors import ConfigError
from micromil_core.models import registry as registry_mod
from micromil_core.models.base import MILModel
from micromil_core.models.mhim import MHIM, encodable_models, hard_instance_mask
from micromil_core.models.registry import (
    build_model,
    model_config,
    params_from_dict,
    params_to_dict,
    register_model,
)
from micromil_core.training.trainer import fit

D, C = 6, 2
ABMIL = {"embed_dims": "16,8", "attn_dim": 8, "dropout": 0.0}
MICROMIL = {"n_clusters": 3, "gnn_hidden": 8, "top_k": 2, "dropout": 0.0, "gnn_backend": "dense"}


def make(seed: int = 0, **params) -> MHIM:
    torch.manual_seed(seed)
    return build_model("mhim", D, C, {"base_params": ABMIL, **params})


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, D, generator=g)  # (B, N, D)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    return torch.where(mask[..., None], x, 100.0), mask


def perturb_student(model: MHIM) -> None:
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.5 * torch.randn_like(p))


# --- the teacher is not state ------------------------------------------------------------


def test_state_dict_and_parameters_hold_the_student_only() -> None:
    model = make()
    torch.manual_seed(0)
    base = build_model("abmil", D, C, ABMIL)
    # The federated payload (state_dict) is exactly the base model's, prefixed.
    assert list(model.state_dict()) == [f"student.{k}" for k in base.state_dict()]
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert "teacher" not in dict(model.named_modules())


def test_recycle_tokens_add_only_their_own_tensors() -> None:
    model = make(recycle_tokens=3)
    extra = [k for k in model.state_dict() if not k.startswith("student.")]
    assert extra and all(k.startswith("recycle.") for k in extra)
    assert model.state_dict()["recycle.queries"].shape == (3, D)


def test_teacher_follows_device_and_dtype() -> None:
    model = make().double()
    assert all(p.dtype == torch.float64 for p in model.teacher.parameters())


def test_start_training_copies_the_student() -> None:
    model = make()
    perturb_student(model)
    assert not torch.equal(model.teacher.head.weight, model.student.head.weight)
    model.start_training()
    teacher, student = model.teacher.state_dict(), model.student.state_dict()
    assert all(torch.equal(teacher[k], student[k]) for k in student)


def test_after_step_is_an_ema_after_warmup_and_a_copy_during_it() -> None:
    model = make(momentum=0.9, warmup=0.5)
    perturb_student(model)
    before = [p.clone() for p in model.teacher.parameters()]
    model.set_progress(0.6)
    model.after_step()
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, t0 + 0.1 * (s - t0))
    model.set_progress(0.1)  # warmup: the teacher tracks the student exactly
    model.after_step()
    for t, s in zip(model.teacher.parameters(), model.student.parameters(), strict=True):
        assert torch.equal(t, s)


def test_momentum_cosine_schedule_reaches_one() -> None:
    model = make(momentum=0.99, momentum_schedule="cosine", warmup=0.0)
    model.set_progress(0.0)
    assert model.momentum_now() == pytest.approx(0.99)
    model.set_progress(1.0)
    assert model.momentum_now() == pytest.approx(1.0)


# --- masking -----------------------------------------------------------------------------


def test_high_mask_removes_the_top_scored_instances() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0], [0.5, 0.2, 0.7, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4 + [False], [True] * 3 + [False] * 2])
    keep, dropped = hard_instance_mask(scores, mask, high=0.5, high_sample=1.0)
    # 0.5 * 4 = 2 exactly: instances 1 and 3; 0.5 * 3 = 1.5 -> 1 or 2 of the top (2, then 0)
    assert keep[0].tolist() == [True, False, True, False, False]
    assert not keep[1, 2] and keep[1, 1] and not dropped.any()
    assert not (keep & ~mask).any()


def test_at_least_one_instance_is_kept_and_padding_never() -> None:
    g = torch.Generator().manual_seed(0)
    x, mask = batch([1, 2, 5, 9])
    scores = torch.rand(mask.shape, generator=g)
    for high, low, rnd in [(1.0, 0.0, 0.0), (0.6, 0.6, 0.9), (0.0, 1.0, 0.0), (0.0, 0.0, 0.99)]:
        for _ in range(20):
            keep, dropped = hard_instance_mask(scores, mask, high, low, rnd, generator=g)
            assert torch.all(keep.sum(1) >= 1)
            assert not (keep & ~mask).any() and not (dropped & ~mask).any()
            assert not (keep & dropped).any()
    keep, _ = hard_instance_mask(scores, mask, high=1.0, high_sample=1.0)
    lowest = scores.masked_fill(~mask, math.inf).argmin(dim=1)  # the one instance left
    assert torch.equal(keep.nonzero()[:, 1], lowest)


def test_random_and_low_masks() -> None:
    scores = torch.arange(10.0)[None].repeat(400, 1)  # (B, 10) instance 9 scores highest
    mask = torch.ones(400, 10, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    keep, dropped = hard_instance_mask(scores, mask, high=0.0, low=0.2, random=0.5, generator=g)
    assert not keep[:, :2].any()  # the two lowest-scored go first
    assert torch.equal(dropped.sum(1), torch.full((400,), 4))  # half of the 8 left
    # Stochastic rounding: 0.25 * 10 masks 2 or 3 instances, 2.5 on average.
    keep, _ = hard_instance_mask(scores, mask, high=0.25, high_sample=0.5, generator=g)
    hidden = (~keep).sum(1).float()
    assert set(hidden.unique().tolist()) <= {2.0, 3.0}
    assert hidden.mean().item() == pytest.approx(2.5, abs=0.1)
    assert keep[:, :4].all()  # drawn from the top n_high / 0.5 = 4 or 6 only


def test_bases_without_scores_refuse_score_masks() -> None:
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="mask_ratio_high: 0"):
        hard_instance_mask(None, mask, high=0.1)
    keep, _ = hard_instance_mask(None, mask, high=0.0, random=0.5)
    assert keep.any()


def test_high_ratio_decays_on_a_cosine_and_warmup_does_not_mask() -> None:
    model = make(mask_ratio_high=0.4, warmup=0.2).train()
    x, mask = batch([6, 4])
    model.set_progress(0.1)
    assert model.mask_ratio_high_now() == 0.0
    loss, parts = model.loss(x, mask, torch.tensor([0, 1]))
    assert parts["masked"] == 0.0 and parts["consistency"] == 0.0
    for progress, expected in [(0.2, 0.4), (0.6, 0.2), (1.0, 0.0)]:
        model.set_progress(progress)
        assert model.mask_ratio_high_now() == pytest.approx(expected)
    model.set_progress(0.3)
    _, parts = model.loss(x, mask, torch.tensor([0, 1]))
    assert 0.0 < parts["masked"] < 1.0


# --- loss and inference ------------------------------------------------------------------


def test_consistency_is_zero_when_teacher_equals_student_without_masking() -> None:
    model = make(
        warmup=0.0,
        mask_ratio_high=0.0,
        mask_ratio_random=0.0,
        teacher_temperature=1.0,
        consistency_weight=0.5,
    ).train()
    x, mask = batch([5, 3])
    y = torch.tensor([0, 1])
    loss, parts = model.loss(x, mask, y)
    assert parts["consistency"] == pytest.approx(0.0, abs=1e-6) and parts["masked"] == 0.0
    assert loss.item() == pytest.approx(parts["ce"], abs=1e-6)


@pytest.mark.parametrize(
    ("base", "base_params", "aux"),
    [
        ("dsmil", {"embed_dims": "8", "q_dim": 8, "dropout": 0.0}, "max_ce"),
        ("clam-sb", {"embed_dim": 8, "attn_dim": 8, "k_sample": 2, "dropout": 0.0}, "instance"),
        ("micromil", {**MICROMIL, "kl_weight": 0.5}, "kl"),
    ],
)
def test_masked_loss_keeps_the_base_models_auxiliary_terms(base, base_params, aux) -> None:
    # With nothing masked and teacher == student, MHIM's training loss is the base's own
    # full loss (instance stream, clustering or KL term included), not a bare CE.
    torch.manual_seed(0)
    model = build_model("mhim", D, C, {"base": base, "base_params": base_params, "warmup": 0.0,
                                       "mask_ratio_high": 0.0, "mask_ratio_random": 0.0,
                                       "teacher_temperature": 1.0})
    model.eval()  # deterministic forward passes for both (MicroMIL: no Gumbel noise)
    model.start_training()
    x, mask = batch([5, 3, 7])
    y = torch.tensor([0, 1, 1])
    own, own_parts = model.student.loss(x, mask, y)
    masked, parts = model.mhim_loss(x, mask, y)
    assert aux in parts and parts[aux] == pytest.approx(own_parts[aux], rel=1e-5)
    assert own.item() != pytest.approx(own_parts["ce"], rel=1e-3)  # the term is not 0
    assert masked.item() == pytest.approx(own.item(), rel=1e-5)


def test_default_loss_is_finite_and_reports_its_parts() -> None:
    model = make(warmup=0.0, recycle_tokens=2).train()
    x, mask = batch([5, 3, 7])
    loss, parts = model.loss(x, mask, torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0]))
    assert torch.isfinite(loss) and parts["consistency"] > 0 and 0 < parts["masked"] < 1
    assert loss.item() == pytest.approx(parts["ce"] + 0.1 * parts["consistency"], rel=1e-5)
    loss.backward()
    queries = model.recycle.queries.clone()
    model.after_step()
    assert not torch.equal(queries, model.recycle.queries)  # EMA toward recycled tokens


def test_multi_scale_bags_are_refused_by_the_masked_loss() -> None:
    from micromil_core.data.bag import collate_bags

    model = make(warmup=0.0, base="mran", base_params={}).train()
    g = torch.Generator().manual_seed(0)
    one = [Bag(f"p{i}", torch.randn(4, D, generator=g), i % 2) for i in range(2)]
    loss, _ = model.loss_batch(collate_bags(one))  # one scale: fine
    assert torch.isfinite(loss)
    two = [Bag("p0", torch.randn(4, D, generator=g), 0, scales=torch.tensor([0, 0, 1, 1]))]
    with pytest.raises(ConfigError, match="scale indices other than 0.*train 'mran' without mhim"):
        model.loss_batch(collate_bags(two))
    model.eval()  # evaluation passes the scales to the base: allowed
    assert torch.isfinite(model.loss_batch(collate_bags(two))[0])


def test_eval_is_the_student_alone_on_the_full_bag() -> None:
    model = make(warmup=0.0).eval()
    perturb_student(model)  # teacher != student: it must not matter at eval
    x, mask = batch([5, 3])
    got, want = model.predict(x, mask), model.student.predict(x, mask)
    assert torch.equal(got.probs, want.probs)
    assert torch.equal(got.instance_scores, want.instance_scores)
    assert torch.equal(model(x, mask), model.student(x, mask))
    y = torch.tensor([0, 1])
    assert torch.equal(model.loss(x, mask, y)[0], model.student.loss(x, mask, y)[0])


# --- config ------------------------------------------------------------------------------


def test_model_config_round_trip_rebuilds_the_same_model() -> None:
    model = make(base="micromil", base_params=MICROMIL, recycle_tokens=2).eval()
    cfg = model_config(model)
    assert cfg["params"]["base_params"]["n_clusters"] == 3
    assert cfg["params"]["base_params"]["proj_dim"] == 0  # defaults filled in
    rebuilt = build_model(**cfg).eval()
    assert rebuilt.params == model.params
    rebuilt.load_state_dict(model.state_dict())
    x, mask = batch([4, 6])
    torch.testing.assert_close(rebuilt(x, mask), model(x, mask))
    p = params_from_dict("mhim", cfg["params"])
    assert params_to_dict(p) == cfg["params"]


def test_yaml_config_and_set_overrides() -> None:
    cfg = load_config(
        "configs/cv/mhim-abmil.yaml",
        ["model.params.base_params.attn_dim=16", "model.params.mask_ratio_high=0.2"],
    )
    p = params_from_dict(cfg.model.name, dict(cfg.model.params))
    assert (p.base, p.base_params["attn_dim"], p.mask_ratio_high) == ("abmil", 16, 0.2)
    p = params_from_dict("mhim", {"base_params": "{embed_dims: '32', dropout: '0.1'}"})
    assert p.base_params["embed_dims"] == [32] and p.base_params["dropout"] == 0.1
    assert params_from_dict("mhim", load_config("configs/cv/mhim-micromil.yaml").model.params)


def test_bad_base_or_base_params_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="abmil") as err:
        build_model("mhim", D, C, {"base": "transmil-ish"})
    assert "micromil" in str(err.value) and "not a registered" in str(err.value)
    with pytest.raises(ConfigError, match="itself"):
        build_model("mhim", D, C, {"base": "mhim"})
    with pytest.raises(ConfigError, match="attn_dim"):
        build_model("mhim", D, C, {"base_params": {"attn_dim": 0}})
    with pytest.raises(ConfigError, match="valid params"):
        build_model("mhim", D, C, {"base_params": {"n_cluster": 3}})
    with pytest.raises(ConfigError, match="mapping"):
        build_model("mhim", D, C, {"base_params": [1, 2]})
    with pytest.raises(ConfigError, match="recycle_dim"):
        build_model("mhim", D, C, {"recycle_dim": 10, "recycle_heads": 4})


@dataclass(frozen=True)
class _NoParams:
    pass


def test_models_without_encode_cannot_be_wrapped() -> None:
    @register_model("opaque-for-test", _NoParams, "test only")
    class Opaque(MILModel):
        def __init__(self, in_dim: int, n_classes: int, params: _NoParams) -> None:
            super().__init__()
            self.in_dim, self.n_classes, self.params = in_dim, n_classes, params

    try:
        assert "opaque-for-test" not in encodable_models()
        with pytest.raises(ConfigError, match="encode"):
            build_model("mhim", D, C, {"base": "opaque-for-test"})
    finally:
        registry_mod._REGISTRY.pop("opaque-for-test")


# --- training ----------------------------------------------------------------------------


def toy_bags(n: int = 16, seed: int = 0) -> list[Bag]:
    """Positive bags hold one or two shifted instances among noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(4 + i % 5, D, generator=g)
        if i % 2:
            x[: 1 + i % 3 % 2, :2] += 3.0
        out.append(Bag(f"p{i}", x, i % 2))
    return out


@pytest.mark.parametrize(
    ("base", "base_params", "recycle"),
    [("abmil", ABMIL, 2), ("micromil", MICROMIL, 0)],
    ids=["abmil-recycle", "micromil"],
)
def test_loss_decreases_through_the_trainer(base: str, base_params: dict, recycle: int) -> None:
    bags = toy_bags(12)
    model = make(base=base, base_params=base_params, warmup=0.2, recycle_tokens=recycle)
    x, mask = _stack(bags)
    model.init_from_data(x, mask)
    y = torch.tensor([b.label for b in bags])

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.loss(x, mask, y)[0])

    before = eval_loss()
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    cfg = TrainConfig(epochs=15, lr=2e-2, batch_size=4, patience=0, seed=0)
    result = fit(model, bags, [], cfg, torch.device("cpu"))
    assert eval_loss() < 0.7 * before
    assert len(result.history) == 15 and all(math.isfinite(e.train_loss) for e in result.history)
    # the teacher moved with training (a copy in warmup, then EMA)
    moved = zip(teacher0, model.teacher.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)


def test_converged_teacher_init_trains_the_base_first_then_mines_from_its_best() -> None:
    """teacher_init: converged = the paper's protocol in one fit: base training selected on
    validation, then masked training from the selected weights, selected among its own epochs."""
    model = make(teacher_init="converged", mask_ratio_high=0.3, warmup=0.5)
    train, val = toy_bags(12), toy_bags(8, seed=1)
    seen: list[tuple[int, bool, float]] = []  # (epoch, masking off, mask ratio) per epoch
    states: dict[int, dict] = {}
    starts: list[dict] = []
    start_training = model.start_training

    def record_start() -> None:
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        start_training()

    model.start_training = record_start  # type: ignore[method-assign]

    def record(entry) -> None:
        seen.append((entry.epoch, model.in_warmup, model.mask_ratio_high_now()))
        states[entry.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = TrainConfig(epochs=6, lr=2e-2, batch_size=4, patience=0, seed=0, select_on="loss")
    result = fit(model, train, val, cfg, torch.device("cpu"), progress=record, baseline_stage=True)
    assert [e.epoch for e in result.history] == list(range(1, 13))
    assert all(off for epoch, off, _ in seen[:6])  # stage 1: the base alone, never masked
    # stage 2: masking from its first epoch (warmup unused), the ratio decaying from full
    assert not any(off for _, off, _ in seen[6:]) and seen[6][2] == pytest.approx(0.3)
    assert 7 <= result.best_epoch <= 12  # selected among the masked epochs only
    # stage 2 started from the stage-1 epoch with the lowest validation loss
    best_base = min(result.history[:6], key=lambda e: e.val_loss).epoch
    assert len(starts) == 2
    for key, value in starts[1].items():
        torch.testing.assert_close(value, states[best_base][key])
    assert not model.baseline_stage


def test_converged_teacher_init_refuses_refit_and_runs_once_in_a_federation() -> None:
    model = make(teacher_init="converged")
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=4, patience=0, seed=0)
    with pytest.raises(ConfigError, match="train.refit"):
        fit(model, toy_bags(8), [], cfg, torch.device("cpu"), epochs=2, baseline_stage=True)
    # a federated round covers part of the run: one stage, masking from the start
    result = fit(model, toy_bags(8), [], cfg, torch.device("cpu"), epochs=1, progress_span=(0.0, 0.5))
    assert len(result.history) == 1 and not model.in_warmup
    # ... also the only round of a 1-round federation, whose span is the whole run
    result = fit(model, toy_bags(8), [], cfg, torch.device("cpu"), epochs=1, progress_span=(0.0, 1.0))
    assert len(result.history) == 1 and not model.in_warmup
    with pytest.raises(ConfigError, match="teacher_init='sometimes' is not one of warmup, converged"):
        make(teacher_init="sometimes")


def test_refit_with_converged_teacher_init_fails_before_any_training(monkeypatch) -> None:
    from micromil_core.training import fitting

    cfg = load_config(None, ["model.name=mhim", "model.params.teacher_init=converged",
                             "train.refit=true", "train.epochs=2"])
    monkeypatch.setattr(fitting, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ConfigError, match="train.refit=false, or model.params.teacher_init=warmup"):
        fitting.train_and_select(cfg, toy_bags(8), toy_bags(4, seed=1), C, torch.device("cpu"))


def _stack(bags: list[Bag]) -> tuple[torch.Tensor, torch.Tensor]:
    from micromil_core.data.bag import collate_bags

    b = collate_bags(bags)
    return b.x, b.mask


def test_dp_sgd_trains_mhim_and_refuses_recycle_tokens() -> None:
    from micromil_core.privacy.dp_sgd import DPPlan, make_private_model, train_private

    model = make(warmup=0.0)
    trained, loss = train_private(
        model, toy_bags(8), DPPlan(1.0, 0.5, 1.0), 3, 1e-3, 0.0, torch.device("cpu"), seed=0
    )
    assert math.isfinite(loss) and list(trained.state_dict()) == list(model.state_dict())
    with pytest.raises(ConfigError, match="DP-SGD"):
        make_private_model(make(recycle_tokens=2))
