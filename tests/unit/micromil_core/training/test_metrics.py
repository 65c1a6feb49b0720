import math

import numpy as np
import pytest

from micromil_core.training.metrics import METRIC_KEYS, classification_metrics, summarize_folds


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(y, probs)
    # predictions: 0,1,0,1,0 -> TP=1 FN=1 TN=2 FP=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # AUC: positive scores 0.7,0.4 vs negatives 0.1,0.6,0.2 -> 5 of 6 pairs ordered
    assert m["auc"] == pytest.approx(5 / 6)
    assert set(METRIC_KEYS) <= set(m)


def test_auc_undefined_with_one_class():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(0.5)


def test_multiclass_macro():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(0.75)
    assert 0 < m["auc"] <= 1


def test_summarize_folds_ignores_nan():
    folds = [
        {k: v for k in METRIC_KEYS for v in [0.5]},
        {k: v for k in METRIC_KEYS for v in [1.0]},
        {**{k: 1.0 for k in METRIC_KEYS}, "auc": math.nan},
    ]
    s = summarize_folds(folds)
    assert s["auc_mean"] == pytest.approx(0.75)
    assert s["accuracy_mean"] == pytest.approx(2.5 / 3)
    assert s["folds"] == 3


def test_corrected_ttest_reduces_to_the_plain_paired_test() -> None:
    from scipy import stats

    from micromil_core.training.metrics import corrected_paired_ttest

    d = np.random.default_rng(0).normal(0.02, 0.05, size=30)
    plain = corrected_paired_ttest(d, test_train_ratio=0.0)
    ref = stats.ttest_1samp(d, 0.0)
    assert plain["t"] == pytest.approx(ref.statistic)
    assert plain["p"] == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)  # scipy's interval for the same plain test
    assert (plain["low"], plain["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_corrected_ttest_inflates_the_variance_by_the_test_train_ratio() -> None:
    from micromil_core.training.metrics import corrected_paired_ttest

    d = np.array([0.1, 0.2, 0.3, 0.0, math.nan])  # the NaN fold is dropped
    out = corrected_paired_ttest(d, test_train_ratio=0.25)
    # mean 0.15, sample variance 0.05 / 3, se = sqrt((1/4 + 1/4) * 0.05 / 3)
    assert out["n"] == 4 and out["mean"] == pytest.approx(0.15)
    assert out["se"] == pytest.approx(math.sqrt(0.5 * 0.05 / 3))
    assert out["p"] > corrected_paired_ttest(d, 0.0)["p"]
    with pytest.raises(ValueError, match="at least 2"):
        corrected_paired_ttest(np.array([0.1, math.nan]), 0.1)


def _scores(n: int, seed: int = 0, ties: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    s[:ties] = 0.5  # exact ties with the decision boundary and with each other
    return y, np.stack([1 - s, s], axis=1)


@pytest.mark.parametrize("threshold", [None, 0.5, 0.3])
def test_bootstrap_fast_path_matches_the_metric_definitions(threshold):
    """Every resample of the vectorised binary path equals classification_metrics on
    the same patients, ties (at 0.5) included, at the default and at fixed thresholds."""
    from micromil_core.training.metrics import _binary_metrics_of_draws, _stratified_draws

    y, probs = _scores(60, ties=8)
    draw, n0, n1 = _stratified_draws(y, 20, np.random.default_rng(3))
    assert (y[draw[:, :n0]] == 0).all() and (y[draw[:, n0:]] == 1).all()
    fast = _binary_metrics_of_draws(probs, draw, n0, n1, threshold)
    for r in range(20):
        slow = classification_metrics(y[draw[r]], probs[draw[r]], threshold)
        for key in METRIC_KEYS:
            assert fast[key][r] == pytest.approx(slow[key], abs=1e-12), key


def test_decision_threshold():
    from micromil_core.training.metrics import decide

    probs = np.array([[0.5, 0.5], [0.8, 0.2], [0.35, 0.65], [0.1, 0.9]])
    assert decide(probs).tolist() == [0, 0, 1, 1]  # argmax; a tie goes to class 0
    assert decide(probs, 0.5).tolist() == [1, 0, 1, 1]  # P(class 1) >= 0.5
    assert decide(probs, 0.7).tolist() == [0, 0, 0, 1]
    y = np.array([0, 0, 1, 1])
    assert classification_metrics(y, probs, 0.7)["sensitivity"] == 0.5
    assert classification_metrics(y, probs, 0.7)["auc"] == classification_metrics(y, probs)["auc"]
    with pytest.raises(ValueError, match="two-class models only"):
        decide(np.full((2, 3), 1 / 3), 0.5)
    with pytest.raises(ValueError, match="not a probability"):
        decide(probs, 1.5)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_patients():
    from micromil_core.training.metrics import bootstrap_intervals

    widths = []
    for n in (20, 500):
        y, probs = _scores(n, seed=1)
        point = classification_metrics(y, probs)
        ci = bootstrap_intervals(y, probs)
        assert set(ci) == set(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert ci[key][0] <= point[key] <= ci[key][1], key
        widths.append(ci["auc"][1] - ci["auc"][0])
    assert widths[1] < widths[0] / 2  # about 1/sqrt(n)
    assert bootstrap_intervals(y, probs) == bootstrap_intervals(y, probs)  # seeded


def test_bootstrap_intervals_one_class_and_multiclass():
    from micromil_core.training.metrics import bootstrap_intervals

    one = bootstrap_intervals(np.ones(6, dtype=int), np.tile([[0.3, 0.7]], (6, 1)))
    assert all(math.isnan(v) for v in one["auc"]) and one["sensitivity"] == [1.0, 1.0]
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), 30)
    probs[np.arange(30), y] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    ci = bootstrap_intervals(y, probs, n_resamples=200)
    point = classification_metrics(y, probs)
    assert ci["auc"][0] <= point["auc"] <= ci["auc"][1] <= 1.0


def test_paired_difference_cancels_what_two_models_share():
    """Two models that make the same ranking errors: the paired interval of their AUC
    difference is narrower than either model's own interval, and it is centred on the
    difference; the same model against itself gives exactly zero."""
    from micromil_core.training.metrics import bootstrap_intervals, paired_bootstrap_difference

    y, probs = _scores(80, seed=2)
    better = probs.copy()
    better[y == 1, 1] = np.minimum(1.0, better[y == 1, 1] + 0.05)  # a small, real gain
    better[:, 0] = 1 - better[:, 1]
    d = paired_bootstrap_difference(y, better, probs)
    own = bootstrap_intervals(y, probs)["auc"]
    auc_gain = classification_metrics(y, better)["auc"] - classification_metrics(y, probs)["auc"]
    assert d["auc"]["difference"] == pytest.approx(auc_gain) and auc_gain > 0
    assert d["auc"]["low"] <= auc_gain <= d["auc"]["high"]
    assert d["auc"]["high"] - d["auc"]["low"] < (own[1] - own[0]) / 2
    same = paired_bootstrap_difference(y, probs, probs)
    assert all(v == 0.0 for key in METRIC_KEYS for v in same[key].values())
    assert paired_bootstrap_difference(np.ones(4, dtype=int), probs[:4], probs[:4]) is None
    with pytest.raises(ValueError, match="different shapes"):
        paired_bootstrap_difference(y, probs, probs[:10])


def test_calibration_brier_and_reliability():
    from micromil_core.training.metrics import calibration

    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9], [0.5, 0.5]])
    c = calibration(y, probs)
    assert c["brier"] == pytest.approx((0.04 + 0.16 + 0.01 + 0.25) / 4)
    assert sum(b["n"] for b in c["bins"]) == 4
    # Probabilities that are risks: drawn labels match them, so the gap is small.
    rng = np.random.default_rng(0)
    p1 = rng.random(20_000)
    y = (rng.random(20_000) < p1).astype(int)
    honest = calibration(y, np.stack([1 - p1, p1], axis=1))
    assert honest["ece"] < 0.02 and honest["brier"] == pytest.approx(1 / 6, abs=0.01)
    # The same scores where only a fifth of patients are positive: overconfident.
    y_rare = (rng.random(20_000) < p1 / 5).astype(int)
    assert calibration(y_rare, np.stack([1 - p1, p1], axis=1))["ece"] > 0.3
    three = calibration(np.array([0, 2]), np.array([[1.0, 0, 0], [0.5, 0, 0.5]]))
    assert three == {"brier": pytest.approx((0 + 0.5) / 2)}


def _site_predictions(n, seed):
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.01, 0.99)
    a = np.stack([1 - p1, p1], axis=1)
    q1 = np.clip(p1 + rng.normal(0, 0.2, n), 0.01, 0.99)
    return y, a, np.stack([1 - q1, q1], axis=1)


def test_mean_paired_difference_weighs_sites_equally_and_skips_one_class_sites():
    from micromil_core.training.metrics import mean_paired_difference, paired_bootstrap_difference

    sites = [_site_predictions(40, 0), _site_predictions(10, 1)]
    one_class = (np.zeros(6, dtype=int), np.full((6, 2), 0.5), np.full((6, 2), 0.5))
    out = mean_paired_difference([*sites, one_class])
    assert out["auc"]["sites"] == 2
    each = [paired_bootstrap_difference(*s)["auc"]["difference"] for s in sites]
    assert out["auc"]["difference"] == pytest.approx(np.mean(each))  # not weighted by patients
    assert out["auc"]["low"] <= out["auc"]["difference"] <= out["auc"]["high"]
    same = mean_paired_difference([(y, a, a) for y, a, _ in sites])
    assert same["auc"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "sites": 2}
    assert mean_paired_difference([one_class]) is None
    with pytest.raises(ValueError, match="differ in shape"):
        mean_paired_difference([(sites[0][0], sites[0][1], sites[0][2][:-1])])


def test_mean_paired_difference_averages_runs_on_the_same_patients():
    from micromil_core.training.metrics import mean_paired_difference

    y, a, b = _site_predictions(30, 2)
    single = mean_paired_difference([(y, a, b)])
    repeated = mean_paired_difference([(y, np.stack([a, a]), np.stack([b, b]))])
    assert repeated["auc"] == pytest.approx(single["auc"])  # the same patients' resamples
    _, a2, b2 = _site_predictions(30, 3)
    mixed = mean_paired_difference([(y, np.stack([a, a2]), np.stack([b, b2]))])
    second = mean_paired_difference([(y, a2, b2)])
    assert mixed["auc"]["difference"] == pytest.approx((single["auc"]["difference"] + second["auc"]["difference"]) / 2)
