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
