"""The report's "Personal models" section (federation.personalise, docs/personalisation.md).

Two sources, either may be missing:

- metrics.json's ``personalised``: what each training site chose without its test patients
  (by k-fold CV over its training and validation patients, or on its validation split: AUC
  of the global and the personal model there, the epoch kept), as the site sent it,
  with values under the small-count guard withheld;
- compare.json's ``own_patients`` (``micromil compare --personalise``): each training site's
  local-only, global and personalised model on that site's own TEST patients, with paired
  bootstrap differences per site and their mean over sites.

The per-site rows and mean lines are shared with the CLI (``format_own_patients``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from micromil_core.report.figures import grouped_bars, has_data, png_uri
from micromil_core.report.sections import _html_table, _img, _section
from micromil_core.report.tables import (
    OWN_PATIENTS_KEY,
    escape,
    finite,
    finite_or_nan,
    format_metric,
    format_seconds,
    metric_text,
)
from micromil_core.training.metrics import OWN_PATIENT_DIFFERENCES, OWN_PATIENT_MODELS
from micromil_core.training.plots import pyplot

PERSONALISED_KEY = "personalised"
# The three models judged on a site's own test patients, in display order, with the colour
# each has in the comparison section (federated C0, local C2) so the two figures agree.
_KIND_LABELS = {"local": "local only", "global": "global (federated)", "personalised": "personalised"}
_KIND_COLORS = {"local": "C2", "global": "C0", "personalised": "C3"}
_METHODS = {
    "finetune": "the final global model trained further on the site's own patients",
    "proximal": "the final global model trained further on the site's own patients, "
                "held near the global model by a proximal term",
    "local-head": "the global model's body with a classifier head of the site's own, "
                  "trained at the site every round",
}


def format_interval(difference: Any) -> str:
    """A paired difference as "+0.012 (95% CI -0.030 to +0.050)", or "n/a"."""
    if not isinstance(difference, Mapping):
        return "n/a"
    d, low, high = (finite(difference.get(k)) for k in ("difference", "low", "high"))
    if d is None:
        return "n/a"
    if low is None or high is None:
        return f"{d:+.3f}"
    return f"{d:+.3f} (95% CI {low:+.3f} to {high:+.3f})"


def own_patients(comparison: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """compare.json's per-site own-patient rows ({} when the run was not personalised)."""
    own = comparison.get(OWN_PATIENTS_KEY) if isinstance(comparison, Mapping) else None
    per_site = own.get("per_site") if isinstance(own, Mapping) else None
    if not isinstance(per_site, Mapping):
        return {}
    return {str(s): row for s, row in per_site.items() if isinstance(row, Mapping)}


def _kind(row: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    metrics = row.get(kind)
    return metrics if isinstance(metrics, Mapping) else {}


def _site_n(row: Mapping[str, Any]) -> Any:
    """The site's test patient count: the same patients for all three models."""
    return next((_kind(row, k)["n"] for k in OWN_PATIENT_MODELS if finite(_kind(row, k).get("n")) is not None),
                None)


def own_patients_rows(comparison: Mapping[str, Any] | None, metric: str = "auc") -> list[list[str]]:
    """One row per training site: site, n, ``metric`` of the local, global and personalised
    model, then personalised - global and personalised - local with their intervals."""
    rows = []
    for site, row in own_patients(comparison).items():
        diffs = [row.get(key) for key in OWN_PATIENT_DIFFERENCES]
        rows.append([
            site,
            format_metric("n", _site_n(row)),
            *(metric_text(_kind(row, k), metric) for k in OWN_PATIENT_MODELS),
            *(format_interval(d.get(metric) if isinstance(d, Mapping) else None) for d in diffs),
        ])
    return rows


def mean_lines(comparison: Mapping[str, Any] | None, metric: str = "auc", minus: str = "−") -> list[str]:
    """The mean over sites of each paired difference, with its interval and site count."""
    own = comparison.get(OWN_PATIENTS_KEY) if isinstance(comparison, Mapping) else None
    if not isinstance(own, Mapping):
        return []
    lines = []
    for key in OWN_PATIENT_DIFFERENCES:
        other = key.rsplit("_", 1)[1]
        mean = own.get(f"mean_{key}")
        mean = mean.get(metric) if isinstance(mean, Mapping) else None
        what = f"personalised {minus} {other} {metric.upper() if metric == 'auc' else metric}"
        sites = finite(mean.get("sites")) if isinstance(mean, Mapping) else None
        if sites is None or format_interval(mean) == "n/a":
            lines.append(f"mean {what} over sites: n/a (no site with a paired difference)")
        else:
            count = f"{int(sites)} site" + ("" if int(sites) == 1 else "s")
            lines.append(f"mean {what} over {count}: {format_interval(mean)}")
    return lines


def format_own_patients(comparison: Mapping[str, Any] | None) -> str:
    """The own-patient comparison as plain text for the CLI (a Markdown table and the mean
    lines), or "" when compare.json has none."""
    rows = own_patients_rows(comparison)
    if not rows:
        return ""
    header = ["site", "n", "local AUC", "global AUC", "personalised AUC", "personalised - global"]
    lines = [
        "Each training site's own test patients (local-only, global and personalised model):",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(c.replace("|", r"\|") for c in row[: len(header)]) + " |" for row in rows),
    ]
    return "\n".join([*lines, *mean_lines(comparison, minus="-")])


def own_patients_figure(per_site: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Grouped bars: per site, the AUC of each model on its test patients; a site whose AUC
    is undefined (its test patients one class) shows "n/a" where its bars would be."""
    sites = list(per_site)
    auc = {k: [finite_or_nan(_kind(per_site[s], k).get("auc")) for s in sites] for k in OWN_PATIENT_MODELS}
    kinds = [k for k in OWN_PATIENT_MODELS if has_data(auc[k])]
    if not kinds:
        return None
    plt = pyplot()
    width = min(11.0, max(4.5, 0.45 * len(sites) * len(kinds) ** 0.5 + 3))
    fig, ax = plt.subplots(figsize=(width, 3.4))
    # grouped_bars takes colours from the cycle, one per series it draws: give each model its own.
    # ("C2" is a cycle reference, which a cycle cannot hold: resolve it first.)
    to_hex = plt.matplotlib.colors.to_hex
    ax.set_prop_cycle(color=[to_hex(_KIND_COLORS[k]) for k in kinds])
    labels = [f"{s}\n(n={format_metric('n', _site_n(per_site[s]))})" for s in sites]
    grouped_bars(ax, labels, {_KIND_LABELS[k]: auc[k] for k in kinds}, "AUC")
    # Values over the bars: an AUC of 0 draws no bar, and must not read as missing.
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    bar = 0.8 / len(kinds)
    for j, _ in enumerate(sites):
        missing = [i for i, k in enumerate(kinds) if not np.isfinite(auc[k][j])]
        if len(missing) == len(kinds):  # the whole site: one mark in the middle
            ax.text(j, 0.04, "n/a", ha="center", va="bottom", fontsize=10, color="0.35")
        for i in missing if len(missing) < len(kinds) else ():
            ax.text(j + (i - (len(kinds) - 1) / 2) * bar, 0.04, "n/a", rotation=90,
                    ha="center", va="bottom", fontsize=7, color="0.35")
    # Sites without a bar still get their full slot, so an "n/a" is never cut at the edge.
    ax.set_xlim(-0.5, len(sites) - 0.5)
    ax.set_ylim(0, 1.08)
    ax.set_title("AUC on each training site's own test patients")
    return png_uri(fig)


def choice_criterion(select_on: str | None, class_weighting: bool = True) -> str | None:
    """What a personal-model choice maximised, in words: ``train.select_on`` and whether the
    loss carries the training class weights (``train.class_weighting``)."""
    if not select_on:
        return None
    if select_on == "auc":
        return "AUC"
    return "class-weighted loss" if class_weighting else "loss"


def choice_line(site: str, m: Mapping[str, Any], chosen_by: str | None = None) -> str:
    """What a training site reported of its personal model, as one line (console and log).
    ``chosen_by`` (``choice_criterion``) names what the choice maximised: by a loss a site
    may keep a model whose AUC is lower, and the line says so."""
    epoch = m.get("personal_epoch")
    chosen = "choice withheld" if epoch is None else ("the global model" if epoch == 0 else f"epoch {epoch}")
    if epoch is not None and chosen_by:
        chosen += f", chosen by {chosen_by}"
    judged = "CV AUC" if _by_cv(m) else "validation AUC"
    return (f"{site}: {judged} global {metric_text(m, 'val_auc_global')} -> personal "
            f"{metric_text(m, 'val_auc_personal')} ({chosen})")


def _withheld(site: Mapping[str, Any], key: str) -> bool:
    """Whether the site withheld ``key`` under the small-count guard (metrics.json lists them)."""
    names = site.get("suppressed")
    return isinstance(names, (list, tuple)) and key in names


def _epoch_text(site: Mapping[str, Any]) -> str:
    """The fine-tuning epoch a site kept; 0 means it kept the global model."""
    if _withheld(site, "personal_epoch"):
        return metric_text(site, "personal_epoch")
    epoch = finite(site.get("personal_epoch"))
    if epoch is None:
        return "n/a"
    return "0 (global kept)" if epoch == 0 else str(int(epoch))


def _by_cv(site: Mapping[str, Any]) -> bool:
    """Whether the site chose by CV: it sent its fold count, or withheld it."""
    return _withheld(site, "personal_folds") or bool(finite(site.get("personal_folds")))


def _judged_text(site: Mapping[str, Any]) -> str:
    """What a site chose its personal model on: k-fold CV or its validation split."""
    folds = finite(site.get("personal_folds"))
    if folds:
        return f"{int(folds)}-fold CV (train + val)"
    return "CV (train + val; folds withheld)" if _by_cv(site) else "validation split"


def _choice_html(personalised: Mapping[str, Any]) -> str:
    """metrics.json's per-site choice (k-fold CV over a site's training and validation
    patients, or its validation patients alone), and any failures."""
    per_site = personalised.get("per_site")
    per_site = per_site if isinstance(per_site, Mapping) else {}
    sites = {str(s): m for s, m in per_site.items() if isinstance(m, Mapping)}
    parts = ["<h3>Choice of each site's personal model (never on its test patients)</h3>"]
    if sites:
        header = ["site", "train patients", "chosen on", "patients chosen on", "AUC, global",
                  "AUC, personal", "epoch kept", "time"]
        parts.append(_html_table(header, [
            [s, format_metric("n", m.get("num-examples")), _judged_text(m), format_metric("n", m.get("num_val")),
             metric_text(m, "val_auc_global"), metric_text(m, "val_auc_personal"),
             _epoch_text(m), format_seconds(m.get("seconds"))]
            for s, m in sites.items()
        ]))
    else:
        parts.append('<p class="note">No training site reported a personal model.</p>')
    failures = personalised.get("failures")
    if isinstance(failures, Sequence) and not isinstance(failures, str) and failures:
        items = "".join(f'<li class="fail">{escape(f)}</li>' for f in failures)
        parts.append(f"<p>Sites that made no personal model:</p><ul>{items}</ul>")
    return "\n".join(parts)


def _own_patients_html(comparison: Mapping[str, Any]) -> str:
    per_site = own_patients(comparison)
    header = ["site", "n", "local AUC", "global AUC", "personalised AUC",
              "personalised − global", "personalised − local"]
    rows = own_patients_rows(comparison)
    # A narrow window may break a difference before its interval, never inside it.
    cells = [[*row[:5], *(c.replace(" ", "\u00a0").replace("\u00a0(", " (") for c in row[5:])]
             for row in rows]
    parts = [
        "<h3>Each training site's own test patients</h3>",
        _img(own_patients_figure(per_site), "AUC on each training site's own test patients"),
        _html_table(header, cells),
        *(f"<p>{escape(line)}</p>" for line in mean_lines(comparison)),
        '<p class="note">Differences are paired: the two models scored on the same patients, '
        "95% intervals by bootstrap over them.</p>",
    ]
    if any(c == "n/a" for row in rows for c in row[2:5]):
        parts.append('<p class="note">AUC n/a: the site\'s test patients are all of one class, '
                     "so AUC is undefined there.</p>")
    return "\n".join(parts)


# federation.personal_rule, in words (federated/personal_cv.py).
_RULES = {
    "one-se": "the fewest epochs (the global model first) whose mean over the CV folds is within one "
              "standard error of the best mean, so a site changes models only for a gain larger than "
              "its folds' noise",
    "best": "the epoch count with the best mean over the CV folds",
}


def _criterion_html(personalised: Mapping[str, Any] | None) -> str:
    """What the choice maximised and by which rule, as the run recorded it (``chosen_by``,
    ``rule``); a run that recorded neither gets the default's words."""
    chosen_by = personalised.get("chosen_by") if personalised else None
    rule = personalised.get("rule") if personalised else None
    if not chosen_by:
        return ("The choice maximises <code>train.select_on</code> (by default the class-weighted "
                "loss), so a personal model may be kept with a lower AUC.")
    text = f"The choice maximises the {escape(str(chosen_by))} (<code>train.select_on</code>)"
    if rule in _RULES:
        text += (f"; with CV it takes {_RULES[rule]} (<code>federation.personal_rule: "
                 f"{escape(str(rule))}</code>)")
    text += "."
    if chosen_by != "AUC":
        text += " A personal model may therefore be kept with a lower AUC."
    return text


def personalisation_section(
    metrics: Mapping[str, Any] | None, comparison: Mapping[str, Any] | None
) -> str:
    """The "Personal models" section, or "" when the run made no personal models."""
    personalised = metrics.get(PERSONALISED_KEY) if isinstance(metrics, Mapping) else None
    personalised = personalised if isinstance(personalised, Mapping) else None
    has_own = bool(own_patients(comparison))
    if personalised is None and not has_own:
        return ""
    parts = []
    method = personalised.get("method") if personalised else None
    if method:
        what = _METHODS.get(str(method))
        parts.append(f"<p>Method: <b>{escape(method)}</b>" + (f", {escape(what)}" if what else "")
                     + ".</p>")
    parts.append(
        '<p class="note">Each training site makes a personal model from the global one and keeps '
        "it: the model never leaves the site, only the numbers below do. A site chooses between "
        "the global model and each epoch count of its own training, by k-fold cross-validation "
        "over its training and validation patients (fine-tuning methods) or on its validation "
        "patients (local-head, DP-SGD, or too few patients for CV); epoch 0: the global model "
        f"was kept. {_criterion_html(personalised)} Its test patients are not used for that choice; "
        "in a simulation they serve only for the comparison of local, global and personal models.</p>"
    )
    if has_own:
        parts.append(_own_patients_html(comparison))
    if personalised is not None:
        parts.append(_choice_html(personalised))
    return _section("personal", "Personal models", "\n".join(parts))
