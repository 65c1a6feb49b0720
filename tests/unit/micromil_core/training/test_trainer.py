import math

import pytest
import torch

from micromil_core.config import TrainConfig
from micromil_core.data.site import load_bags, load_site
from micromil_core.errors import CheckpointError
from micromil_core.models.registry import build_model
from micromil_core.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from micromil_core.training.trainer import build_optimizer, class_weights, fit, predict_bags
from tests.conftest import write_site

CPU = torch.device("cpu")


def _bags(tmp_path, **kw):
    site = load_site(write_site(tmp_path / "s", **kw))
    return site, load_bags(site)


def test_class_weights_inverse_frequency():
    w = class_weights([0, 0, 0, 1], 2)
    assert w.tolist() == pytest.approx([4 / 6, 4 / 2])
    assert class_weights([0, 0], 3).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_fit_keeps_best_validation_epoch(tmp_path):
    _, bags = _bags(tmp_path, n_patients=16)
    torch.manual_seed(0)
    model = build_model("gated-abmil", 6, 2)
    cfg = TrainConfig(epochs=8, lr=1e-2, patience=0, select_on="loss")
    result = fit(model, bags[:10], bags[10:], cfg, CPU)
    losses = [e.val_loss for e in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    # The returned model carries the best epoch's weights, not the last epoch's.
    y, probs = predict_bags(model, bags[10:], CPU)
    nll = -torch.log(torch.from_numpy(probs)[range(len(y)), y].clamp_min(1e-7))
    w = class_weights([b.label for b in bags[:10]], 2)[y]
    assert float((nll * w).sum() / w.sum()) == pytest.approx(min(losses), rel=1e-4)


def test_early_stopping_when_validation_stalls(tmp_path):
    _, bags = _bags(tmp_path)
    model = build_model("mean-pool", 6, 2)
    cfg = TrainConfig(epochs=50, lr=1e-12, patience=3, min_epochs=0)
    result = fit(model, bags[:8], bags[8:], cfg, CPU)
    assert result.stopped_early
    assert len(result.history) == 1 + 3  # first epoch sets the best; 3 stale epochs stop it


def test_training_is_reproducible(tmp_path):
    _, bags = _bags(tmp_path)
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = build_model("micromil", 6, 2, {"n_clusters": 4})
        fit(model, bags[:8], bags[8:], TrainConfig(epochs=2, lr=1e-3, seed=5), CPU)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_sgd_with_momentum_trains(tmp_path):
    _, bags = _bags(tmp_path)
    model = build_model("abmil", 6, 2, {"embed_dims": "8", "attn_dim": 4})
    opt = build_optimizer(model.parameters(), "sgd", 0.1, 0.0, momentum=0.9)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9, seed=1)
    result = fit(model, bags[:8], [], cfg, CPU)
    assert math.isfinite(result.history[-1].train_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizer_gives_the_plain_update(name):
    """build_optimizer fuses on CPU; 30 steps of it equal torch's per-tensor loop up to rounding."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (3, 1, 8)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(30)]
    finals = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build_optimizer(params, name, 1e-2, 1e-4, momentum=0.9)
        if not fused:
            kind = torch.optim.SGD if name == "sgd" else torch.optim.Adam
            extra = {"momentum": 0.9} if name == "sgd" else {}
            opt = kind(params, lr=1e-2, weight_decay=1e-4, foreach=False, **extra)
        assert bool(opt.defaults.get("fused")) is fused
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for fused_final, plain_final, first in zip(*finals, start, strict=True):
        assert not torch.equal(fused_final, first)
        torch.testing.assert_close(fused_final, plain_final, rtol=1e-5, atol=1e-6)


def test_optimizer_is_not_fused_across_devices_or_for_integer_tensors():
    from micromil_core.training.trainer import _fusable

    assert _fusable([torch.zeros(2, requires_grad=True)])
    assert _fusable([{"params": [torch.zeros(2)]}, {"params": [torch.zeros(3)]}])
    assert not _fusable([torch.zeros(2, device="meta")])
    assert not _fusable([torch.zeros(2, dtype=torch.int64)])
    assert not _fusable([])


def test_no_validation_keeps_last_epoch(tmp_path):
    _, bags = _bags(tmp_path)
    model = build_model("abmil", 6, 2)
    result = fit(model, bags, [], TrainConfig(epochs=2), CPU)
    assert result.best_epoch == 2 and math.isnan(result.history[-1].val_loss)


def test_checkpoint_round_trip(tmp_path):
    site, bags = _bags(tmp_path)
    model = build_model("micromil", 6, 2, {"n_clusters": 4, "top_k": 2})
    ckpt = Checkpoint("micromil", 6, 2, {"n_clusters": 4, "top_k": 2}, list(site.classes), model.state_dict(),
                      config={"train": {"lr": 1e-3}}, provenance={"round": 3})
    path = save_checkpoint(ckpt, tmp_path / "run" / "model.pt")
    back = load_checkpoint(path)
    assert back.classes == ["benign", "malignant"] and back.provenance["round"] == 3
    assert back.provenance["code_version"]
    _, p1 = predict_bags(model, bags, CPU)
    _, p2 = predict_bags(back.build_model(), bags, CPU)
    assert (p1 == p2).all()


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a micromil checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # A file that pickles code is refused, and the message does not pass on PyTorch's
    # advice to load it with weights_only=False (which would run that code).
    torch.save({"format": "micromil-checkpoint/1", "hook": print}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="holds code rather than data") as info:
        load_checkpoint(tmp_path / "code.pt")
    assert "weights_only" not in str(info.value)


def test_refit_retrains_on_all_patients_for_the_selected_epochs(tmp_path, monkeypatch):
    from micromil_core.config import build_config
    from micromil_core.training import fitting

    _, bags = _bags(tmp_path, n_patients=16)
    calls = []
    real_fit = fitting.fit

    def spy(model, train, val, cfg, device, progress=None, extra_loss=None, epochs=None,
            progress_span=(0.0, 1.0), baseline_stage=False):
        calls.append((len(train), len(val), epochs, progress_span))
        return real_fit(model, train, val, cfg, device, progress=progress, epochs=epochs,
                        progress_span=progress_span, baseline_stage=baseline_stage)

    monkeypatch.setattr(fitting, "fit", spy)
    cfg = build_config({"model": {"name": "mean-pool"}, "train": {"epochs": 4, "refit": True, "patience": 0}})
    _, _, result = fitting.train_and_select(cfg, bags[:12], bags[12:], 2, CPU)
    # The refit replays the selected epochs at the progress they had (schedules: HMIL, MRAN).
    assert calls == [(12, 4, None, (0.0, 1.0)), (16, 0, result.best_epoch, (0.0, result.best_epoch / 4))]
