"""Recalibrating a model's probabilities at a hospital: the fits recover a known
distortion, keep the ranking (AUC) and refuse what cannot be fitted."""

import numpy as np
import pytest

from micromil_core.errors import ConfigError
from micromil_core.training.metrics import calibration, classification_metrics
from micromil_core.training.recalibration import apply_calibration, fit_calibration


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _distorted(n=20_000, a=2.0, b=1.5, seed=0):
    """Labels drawn from true risks p, and the model's overconfident, shifted report
    sigmoid(a * logit p + b) of them."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < p).astype(int)
    q = 1 / (1 + np.exp(-(a * _logit(p) + b)))
    return y, np.stack([1 - q, q], axis=1)


def test_platt_recovers_the_inverse_distortion():
    y, probs = _distorted(a=2.0, b=1.5)
    fit = fit_calibration(y, probs, "platt")
    a, b = fit["params"]
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-0.75, abs=0.06)
    fixed = apply_calibration(probs, fit)
    assert calibration(y, fixed)["ece"] < 0.02 < calibration(y, probs)["ece"]
    assert classification_metrics(y, fixed)["auc"] == pytest.approx(
        classification_metrics(y, probs)["auc"]
    )
    assert np.allclose(fixed.sum(axis=1), 1.0)


def test_temperature_recovers_overconfidence_for_many_classes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20_000, 3)) * 1.5
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in true])
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)  # T = 1/3
    fit = fit_calibration(y, sharp, "temperature")
    assert fit["params"][0] == pytest.approx(3.0, rel=0.05)
    assert np.abs(apply_calibration(sharp, fit) - true).max() < 0.02
    assert (apply_calibration(sharp, fit).argmax(1) == sharp.argmax(1)).all()


def test_bad_calibrations_are_refused():
    y, probs = _distorted(n=50)
    with pytest.raises(ConfigError, match="two-class models"):
        fit_calibration(np.array([0, 1, 2]), np.full((3, 3), 1 / 3), "platt")
    with pytest.raises(ConfigError, match="all of one class"):
        fit_calibration(np.ones(50, dtype=int), probs, "platt")
    with pytest.raises(ConfigError, match="not one of"):
        fit_calibration(y, probs, "isotonic")
    assert apply_calibration(probs, None) is probs
