"""Local DP-SGD with one patient as the privacy unit: per-patient gradients, clipping,
noise scale, accounting against Opacus, the site's ledger and budget stop, settings
validation, node config and the privacy report (tiny synthetic bags: plumbing only)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.common.config import parse_config_args

from micromil_core.cli import main
from micromil_core.config import LocalPrivacyConfig, build_section, load_config
from micromil_core.data.bag import Bag, collate_bags
from micromil_core.errors import ConfigError, PrivacyBudgetExhausted
from micromil_core.models.registry import build_model
from micromil_core.privacy.dp_sgd import (
    DPPlan,
    dp_optimizer,
    make_private_model,
    mark_empty_step,
)
from micromil_core.privacy.ledger import LEDGER_FILE, PrivacyLedger
from micromil_core.privacy.node_config import from_node_config, to_node_config
from micromil_core.privacy.report import budget_stops, format_report, privacy_report
from micromil_core.privacy.site_round import private_train_round

D = 8
SMALL_MICROMIL = {"n_clusters": 4, "gnn_hidden": 8, "top_k": 2, "dropout": 0.0}


def bags(n: int, seed: int = 0, scale: float = 1.0) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = int(torch.randint(2, 9, (1,), generator=g))
        x = torch.randn(size, D, generator=g) * scale
        x[0] += 2.0 * (i % 2)
        out.append(Bag(f"p{i:03d}", x, i % 2))
    return out


def private_round(model, data, privacy, state_dir, rnd, planned=3, run="run-a"):
    return private_train_round(
        model, data, "site-a", privacy, state_dir, run, rnd, planned, 1, 1e-3, 0.0, 4,
        torch.device("cpu"), seed=rnd,
    )


@pytest.mark.parametrize("name,params", [("micromil", SMALL_MICROMIL), ("gated-abmil", {})])
def test_one_gradient_per_patient(name, params):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = make_private_model(build_model(name, D, 2, params))  # MicroMIL -> dense GAT
    gsm = GradSampleModule(model, loss_reduction="mean")
    batch = collate_bags(bags(5))
    loss, _ = gsm._module.loss(batch.x, batch.mask, batch.y)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad_sample.shape == (5, *p.shape), pname


def test_frozen_parameters_stay_frozen_under_dp_sgd():
    from micromil_core.privacy.dp_sgd import state_dict_for, train_private

    torch.manual_seed(0)
    model = build_model("micromil", D, 2, SMALL_MICROMIL)
    model.proj.requires_grad_(False)
    model.gnn.convs[0].requires_grad_(False)  # a GAT layer: its keys change with the backend
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, max_grad_norm=1.0)
    trained, _ = train_private(model, bags(8), plan, 3, 1e-2, 0.0, torch.device("cpu"), seed=0)
    after = state_dict_for(model, trained)
    frozen = [k for k in before if k.startswith(("proj.", "gnn.convs.0."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_micromil_inside_a_wrapper_trains_privately_and_keeps_its_layout(tmp_path):
    """MHIM around a PyG-backed MicroMIL: DP-SGD runs on a dense copy and the weights come
    back in the original (PyG) layout, so the global model still loads them."""
    torch.manual_seed(0)
    base_params = {**SMALL_MICROMIL, "gnn_backend": "pyg"}
    model = build_model("mhim", D, 2, {"base": "micromil", "base_params": base_params, "warmup": 0})
    assert model.student.params.gnn_backend == "pyg"
    privacy = LocalPrivacyConfig(mode="dp-sgd", target_epsilon=5.0, delta=1e-3)
    state, metrics = private_round(model, bags(12), privacy, tmp_path, 1)
    assert model.student.params.gnn_backend == "pyg"  # the original is untouched
    assert state.keys() == model.state_dict().keys()
    model.load_state_dict(state)
    assert 0 < metrics["epsilon"] <= 5.0


def _contribution(model, bag, plan) -> float:
    """Norm of one patient's summed clipped gradient, as DPOptimizer accumulates it."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = dp_optimizer(model, plan, lr=1e-3, weight_decay=0.0, n_patients=1)
    opt.zero_grad(set_to_none=True)
    batch = collate_bags([bag])
    loss, _ = gsm._module.loss(batch.x, batch.mask, batch.y)
    loss.backward()
    raw = torch.sqrt(sum(p.grad_sample.pow(2).sum() for p in model.parameters()))
    opt.clip_and_accumulate()
    clipped = torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in model.parameters()))
    gsm._close()
    return float(raw), float(clipped)


def test_clipping_bounds_each_patients_contribution():
    torch.manual_seed(0)
    model = make_private_model(build_model("abmil", D, 2, {"dropout": 0.0}))
    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=0.05)
    for bag in bags(4, scale=50.0):
        raw, clipped = _contribution(model, bag, plan)
        assert raw > 0.05  # the bound was binding ...
        assert clipped <= 0.05 * (1 + 1e-5)  # ... and holds


def test_noise_std_is_noise_multiplier_times_clipping_norm():
    torch.manual_seed(0)
    model = make_private_model(build_model("micromil", D, 2, {**SMALL_MICROMIL, "gnn_hidden": 64}))
    plan = DPPlan(noise_multiplier=1.5, sample_rate=0.5, max_grad_norm=0.4)
    opt = dp_optimizer(model, plan, 1e-3, 0.0, n_patients=10, generator=torch.Generator().manual_seed(1))
    mark_empty_step(model)  # an empty Poisson sample: the step is pure noise
    assert opt.pre_step()
    # DPOptimizer divides the noisy sum by the expected batch size q * n = 5.
    noise = torch.cat([p.grad.flatten() * 5 for p in model.parameters()])
    assert noise.numel() > 5000
    assert float(noise.std()) == pytest.approx(1.5 * 0.4, rel=0.05)
    assert abs(float(noise.mean())) < 0.05


def test_reported_epsilon_equals_opacus_accountant(tmp_path):
    from opacus.accountants import RDPAccountant

    privacy = LocalPrivacyConfig(mode="dp-sgd", noise_multiplier=1.3, delta=1e-3)
    model = build_model("micromil", D, 2, SMALL_MICROMIL)
    data = bags(40)
    for rnd in (1, 2):
        state, metrics = private_round(model, data, privacy, tmp_path, rnd)
        model.load_state_dict(state)  # weights come back in the model's own (pyg) layout
    accountant = RDPAccountant()
    rate = 4 / 40  # train.batch_size / patients
    for _ in range(2 * round(1 / rate)):
        accountant.step(noise_multiplier=1.3, sample_rate=rate)
    assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    assert metrics["sample_rate"] == rate and metrics["dp_steps"] == 10
    assert metrics["epsilon_budget"] == 0 and metrics["epsilon_next"] > metrics["epsilon"]


def test_site_stops_at_its_budget_and_ledger_persists(tmp_path):
    privacy = LocalPrivacyConfig(mode="dp-sgd", target_epsilon=2.0, delta=1e-3)
    model = build_model("gated-abmil", D, 2, {})
    data = bags(30)
    spent = []
    for rnd in (1, 2, 3):  # noise calibrated so the 3 planned rounds spend the budget
        _, metrics = private_round(model, data, privacy, tmp_path, rnd, planned=3)
        spent.append(metrics["epsilon"])
    assert spent == sorted(spent) and 1.9 < spent[-1] <= 2.0
    assert metrics["epsilon_next"] > 2.0 and budget_stops([{"site-a": metrics}])
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match="past its budget of 2"):
        private_round(model, data, privacy, tmp_path, 4, planned=3)
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # a refused round spends nothing
    # A restarted site reads the same ledger, and still refuses.
    ledger = PrivacyLedger(tmp_path)
    assert ledger.run("run-a").epsilon() == pytest.approx(spent[-1])
    assert [r["round"] for r in ledger.run("run-a").rounds] == [1, 2, 3]
    # Another federation run has its own budget; the ledger composes all runs.
    _, other = private_round(model, data, privacy, tmp_path, 1, run="run-b")
    assert other["epsilon"] == pytest.approx(spent[0])
    assert PrivacyLedger(tmp_path).total_epsilon(1e-3) > spent[-1]


def test_damaged_ledger_blocks_training_and_is_kept(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{not json")
    privacy = LocalPrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(ConfigError, match="unreadable"):
        private_round(build_model("abmil", D, 2, {}), bags(20), privacy, tmp_path, 1)
    assert (tmp_path / LEDGER_FILE).read_text() == "{not json"


def test_delta_must_be_below_one_over_patients(tmp_path):
    privacy = LocalPrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, delta=0.1)
    with pytest.raises(ConfigError, match=r"privacy.delta=0.1 is not below 1/20"):
        private_round(build_model("abmil", D, 2, {}), bags(20), privacy, tmp_path, 1)
    assert not (tmp_path / LEDGER_FILE).exists()


@pytest.mark.parametrize("override,message", [
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.sample_rate=1.5", "privacy.sample_rate"),
    ("privacy.accountant=moments", "privacy.accountant"),
])
def test_bad_local_privacy_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.noise_multiplier=1", override])


def test_dp_needs_budget_or_noise_and_central_noise_needs_clipping():
    with pytest.raises(ConfigError, match="target_epsilon"):
        load_config(None, ["privacy.mode=dp-sgd"])
    with pytest.raises(ConfigError, match="clipping_norm is 0"):
        load_config(None, ["privacy.central.mode=fixed-clipping", "privacy.central.noise_multiplier=1"])


def test_unreachable_budget_is_a_config_error(tmp_path):
    privacy = LocalPrivacyConfig(mode="dp-sgd", target_epsilon=1e-4, delta=1e-3)
    with pytest.raises(ConfigError, match="cannot be reached"):
        private_round(build_model("abmil", D, 2, {}), bags(20), privacy, tmp_path, 1, planned=50)


def test_node_config_round_trip():
    privacy = build_section("privacy", LocalPrivacyConfig, {"mode": "dp-sgd", "target_epsilon": 8, "delta": 1e-5})
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in to_node_config(privacy).items())
    assert from_node_config(parse_config_args([text])) == privacy
    assert to_node_config(LocalPrivacyConfig()) == {}
    assert from_node_config({"site-name": "h1"}) == LocalPrivacyConfig()


def _history(tmp_path):
    site = {"epsilon": 1.0, "delta": 1e-5, "epsilon_budget": 2.0, "epsilon_next": 1.6,
            "noise_multiplier": 1.1, "sample_rate": 0.1, "max_grad_norm": 1.0, "num-examples": 9}
    rounds = [
        {"round": 1, "train": {"site-0": site, "site-1": {"num-examples": 5}}},
        {"round": 2, "train": {"site-0": {**site, "epsilon": 1.6, "epsilon_next": 2.1}}},
    ]
    (tmp_path / "history.json").write_text(json.dumps({"run": {}, "rounds": rounds}))
    return rounds


def test_budget_stops_and_privacy_report(tmp_path, capsys):
    rounds = _history(tmp_path)
    assert budget_stops(r["train"] for r in rounds[:1]) == {}
    stops = budget_stops(r["train"] for r in rounds)
    assert list(stops) == ["site-0"] and "another round would reach 2.10" in stops["site-0"]
    report = privacy_report(tmp_path)
    assert report["sites"]["site-0"]["epsilon"] == {1: 1.0, 2: 1.6}
    assert report["sites"]["site-0"]["stopped"] and report["non_dp_sites"] == ["site-1"]
    text = format_report(report)
    assert "site-0: epsilon 1.600 of budget 2.0" in text and "stopped at its budget" in text
    assert main(["privacy-report", str(tmp_path)]) == 0
    assert "Local DP-SGD" in capsys.readouterr().out
    assert main(["privacy-report", str(tmp_path / "missing")]) == 2
