"""Recalibrating a trained model's probabilities at one hospital, without retraining it.

A federated model ranks patients well at a new hospital (AUC) but its probabilities carry
the training patients' class balance: where the hospital's prevalence differs, a predicted
0.8 may mean a 20 % risk (``micromil evaluate`` shows it: ECE, calibration.png). The
hospital fixes that with a few of its own patients whose diagnosis is known (a validation
or calibration set, never the patients it reports results on):

* ``platt`` (two-class models): logit p' = a * logit p + b, fitted by likelihood. It can
  shift (prevalence) and sharpen or soften (over- or under-confidence).
* ``temperature`` (any number of classes): p' = softmax(log p / T); only softens or
  sharpens, keeps the argmax.

Both are monotone, so AUC and the ranking of patients do not change; the decision at a
fixed threshold and every probability-based number do. The fitted parameters travel in
the checkpoint (``calibration``) and ``evaluate``/``predict``/``explain`` apply them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from micromil_core.errors import ConfigError

METHODS = ("platt", "temperature")
_EPS = 1e-6


def _log_probs(probs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)).log()


def _platt_logits(log_p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Binary: the calibrated logit of class 1, a * (log p1 - log p0) + b."""
    return a * (log_p[:, 1] - log_p[:, 0]) + b


def fit_calibration(y_true: np.ndarray, probs: np.ndarray, method: str) -> dict[str, Any]:
    """Fit ``method`` to labels (n,) and probabilities (n, C) by maximum likelihood.

    Returns ``{"method", "params"}``: platt [a, b], temperature [T].

    Raises:
        ConfigError: unknown method, platt on a multi-class model, or patients of one class
            only (nothing to fit against).
    """
    y = np.asarray(y_true, dtype=int)
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if method == "platt" and probs.shape[1] != 2:
        raise ConfigError(
            f"platt calibration is for two-class models; this one has {probs.shape[1]} "
            f"classes: use --method temperature"
        )
    if len(np.unique(y)) < 2:
        raise ConfigError(
            f"calibration needs patients of at least two classes; the {len(y)} given are all "
            f"of one class: add patients of the other class(es)"
        )
    log_p = _log_probs(probs)
    target = torch.from_numpy(y)
    if method == "platt":
        params = [torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
    else:  # fit log T so that T stays positive
        params = [torch.zeros((), dtype=torch.float64)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        if method == "platt":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                _platt_logits(log_p, *params), target.double()
            )
        else:
            loss = torch.nn.functional.cross_entropy(log_p / params[0].exp(), target)
        loss.backward()
        return loss

    optimizer.step(nll)
    values = [float(p.detach()) for p in params]
    if method == "temperature":
        values = [float(np.exp(values[0]))]
    return {"method": method, "params": values}


def apply_calibration(probs: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """``probs`` (n, C) recalibrated by a fitted ``calibration`` (None: unchanged)."""
    if not calibration:
        return probs
    log_p = _log_probs(probs)
    method, params = calibration["method"], calibration["params"]
    if method == "platt":
        p1 = torch.sigmoid(_platt_logits(log_p, *map(torch.tensor, params)))
        out = torch.stack([1 - p1, p1], dim=1)
    elif method == "temperature":
        out = torch.softmax(log_p / params[0], dim=1)
    else:
        raise ConfigError(f"checkpoint calibration method {method!r} is not one of {METHODS}")
    return out.numpy().astype(probs.dtype, copy=False)
