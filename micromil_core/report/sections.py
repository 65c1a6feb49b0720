"""The report's HTML sections, each read from the typed run history."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from micromil_core.config import MIN_PATIENTS_FLOOR
from micromil_core.federated.history import RoundRecord, RunHistory
from micromil_core.privacy.disclosure import suppressed_note
from micromil_core.report.figures import (
    bars_figure,
    communication_figure,
    curves_figure,
    has_data,
    roc_figure,
    train_sites_figure,
)
from micromil_core.report.tables import (
    comparison_rows,
    escape,
    finite,
    finite_or_nan,
    format_bytes,
    format_metric,
    format_paired_difference,
    format_seconds,
    metric_text,
    table_keys,
    with_auc_interval,
)
from micromil_core.training.metrics import METRIC_KEYS

METRICS_FILE = "metrics.json"


Rounds = Sequence[RoundRecord]


def _round_numbers(rounds: Rounds) -> list[int]:
    return [r.round for r in rounds]


def _phase(record: RoundRecord, phase: str) -> dict[str, dict[str, Any]]:
    """A round's per-site metrics of one phase: "train", "evaluate" or "holdout"."""
    return getattr(record, phase)


def _sites(rounds: Iterable[RoundRecord], phase: str) -> list[str]:
    """Site names seen in ``phase`` over all rounds, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rounds:
        for site in _phase(r, phase):
            seen.setdefault(site, None)
    return list(seen)


def _series(rounds: Rounds, field: str, *path: str) -> list[float]:
    """The value at ``round.<field>[path[0]][path[1]]...`` for every round (NaN where missing)."""
    out = []
    for r in rounds:
        node: Any = getattr(r, field)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        out.append(finite_or_nan(node))
    return out


def _all_withheld(rounds: Rounds, phase: str, key: str) -> bool:
    """True if some site reported ``phase`` metrics and every one withheld ``key``."""
    reports = [m for r in rounds for m in _phase(r, phase).values()]
    return bool(reports) and all(key in (m.get("suppressed") or []) for m in reports)


def _withheld_note(rounds: Rounds, phase: str) -> str:
    limits = [finite(m.get("min_patients")) for r in rounds for m in _phase(r, phase).values()]
    return suppressed_note(int(max((v for v in limits if v is not None), default=MIN_PATIENTS_FLOOR)))


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1000px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b6ea5; padding-bottom: .2em; }
h2 { font-size: 1.25em; color: #3b6ea5; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
.wide { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #eef3f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
td.na { color: #999; text-align: right; white-space: nowrap; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0 1em; }
.note { color: #666; font-size: .9em; }
.fail { color: #a33; }
footer { margin-top: 3em; color: #888; font-size: .85em; }
"""


def _td(text: str, numeric: bool = True) -> str:
    if text == "n/a" or text.startswith("suppressed"):
        return f'<td class="na">{escape(text)}</td>'
    return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_td(c, numeric=i >= numeric_from) for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    # Wide tables scroll inside their own box, so a narrow window never scrolls the page.
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _metric_table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str], first: str) -> str:
    return _html_table(
        [first, *keys],
        [[str(name), *(metric_text(m if isinstance(m, Mapping) else {}, k) for k in keys)] for name, m in rows.items()],
    )


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<p class="note">{escape(alt)}: n/a (no finite values).</p>'
    return f'<img src="{uri}" alt="{escape(alt)}">'


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(heading)}</h2>\n{body}\n</section>'




def summary_section(history: RunHistory) -> str:
    run, rounds = history.run, history.rounds
    sent = [finite(r.bytes_sent) for r in rounds]
    received = [finite(r.bytes_received) for r in rounds]
    wall = [finite(r.wall_seconds) for r in rounds]

    def total(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def per_round(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    def names(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value)) if value else "none"
        return "n/a" if value is None else str(value)

    rounds_text = f"{len(rounds)} completed"
    if run.rounds is not None:
        rounds_text += f" of {run.rounds} planned"
    sent_pr, recv_pr = per_round(sent), per_round(received)
    rows = [
        ("model", names(run.model)),
        ("strategy", names(run.strategy)),
        ("rounds", rounds_text),
        ("local epochs per round", names(run.local_epochs)),
        ("training sites", names(run.train_sites)),
        ("held-out sites", names(run.holdout_sites)),
        ("seed", names(run.seed)),
        ("started (UTC)", names(run.started)),
        # Rounds only: start-up, pre-flight checks and waiting for sites are not in it.
        ("time spent in rounds (sum)", format_seconds(total(wall))),
        ("bytes sent (total)", format_bytes(total(sent))),
        ("bytes received (total)", format_bytes(total(received))),
        ("bytes sent per round (mean)", format_bytes(sent_pr)),
        ("bytes received per round (mean)", format_bytes(recv_pr)),
    ]
    table = (
        "<table><tbody>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )
    return _section("summary", "Run summary", table)


def _final_holdout(
    rounds: Rounds,
) -> tuple[int | None, dict[str, Any], dict[str, Any]]:
    """(round number, per-site metrics, aggregated metrics) of the last round with held-out data."""
    numbers = _round_numbers(rounds)
    for number, r in zip(reversed(numbers), reversed(rounds), strict=True):
        if r.holdout or r.holdout_aggregated:
            return number, r.holdout, r.holdout_aggregated
    return None, {}, {}


def _with_count(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A site's metrics with its patient count under ``n``, as the table's column reads it
    (a site reports it as ``num-examples``)."""
    return {**metrics, "n": metrics.get("n", metrics.get("num-examples"))}


def _all_sites_row(aggregated: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The patient-weighted row over all held-out sites, with its patient count; with one
    held-out site it is that site's patients, so its AUC interval is the site's too."""
    row = dict(aggregated)
    counts = [finite(m.get("n")) for m in sites.values()]
    if finite(row.get("n")) is None and counts and None not in counts:
        row["n"] = int(sum(counts))
    if len(sites) == 1 and "auc_ci_low" not in row:
        (only,) = sites.values()
        row.update({k: only[k] for k in ("auc_ci_low", "auc_ci_high") if k in only})
    return row


def holdout_section(metrics: Mapping[str, Any] | None, rounds: Rounds) -> str:
    if metrics:
        per_site = metrics.get("per_site")
        sites = {str(k): _with_count(m) for k, m in (per_site.items() if isinstance(per_site, Mapping) else ())
                 if isinstance(m, Mapping)}
        rows: dict[str, Mapping[str, Any]] = {"all held-out sites": _all_sites_row(metrics, sites)}
        rows.update(sites)
        source = f"From {METRICS_FILE} (final model)."
    else:
        number, per_site, aggregated = _final_holdout(rounds)
        if number is None:
            return _section(
                "holdout",
                "Held-out metrics",
                '<p class="note">n/a: this run has no held-out sites.</p>',
            )
        sites = {site: _with_count(m) for site, m in per_site.items()}
        rows = {"all held-out sites": _all_sites_row(aggregated, sites)} if aggregated else {}
        rows.update(sites)
        source = f"From the history, round {number} ({METRICS_FILE} not found)."
    rows = {name: with_auc_interval(m) for name, m in rows.items()}
    body = f'<p class="note">{escape(source)}</p>' + _metric_table(rows, table_keys(rows), "held-out")
    return _section("holdout", "Held-out metrics", body)


def curves_section(rounds: Rounds) -> str:
    x = _round_numbers(rounds)
    thin = {"lw": 0.9, "alpha": 0.8}
    bold = {"lw": 2.2, "color": "black"}

    loss: dict[str, tuple[Sequence[float], dict]] = {
        "aggregated": (_series(rounds, "train_aggregated", "train_loss"), bold)
    }
    for site in _sites(rounds, "train"):
        loss[site] = (_series(rounds, "train", site, "train_loss"), thin)

    # Validation of the training sites: the evaluate step when the server ran one, else the
    # val_auc each site reported alongside its fit.
    val: dict[str, tuple[Sequence[float], dict]] = {
        "aggregated (evaluate)": (_series(rounds, "evaluate_aggregated", "auc"), bold),
        "aggregated (fit)": (
            _series(rounds, "train_aggregated", "val_auc"),
            {"lw": 2.0, "color": "dimgray", "ls": "--"},
        ),
    }
    for site in _sites(rounds, "train"):
        per_site = _series(rounds, "evaluate", site, "auc")
        if not has_data(per_site):
            per_site = _series(rounds, "train", site, "val_auc")
        val[site] = (per_site, thin)

    held: dict[str, tuple[Sequence[float], dict]] = {}
    for site in _sites(rounds, "holdout"):
        held[f"{site} AUC"] = (_series(rounds, "holdout", site, "auc"), {"lw": 1.6})
        held[f"{site} accuracy"] = (
            _series(rounds, "holdout", site, "accuracy"),
            {"lw": 1.2, "ls": "--"},
        )

    body = "\n".join(
        [
            "<h3>Training loss</h3>",
            _img(
                curves_figure(x, loss, "train loss", "train loss per round"),
                "train loss per round",
            ),
            "<h3>Validation AUC of the training sites</h3>",
            _img(
                curves_figure(x, val, "AUC", "validation AUC per round", (0, 1.02)),
                "validation AUC per round",
            )
            if not _all_withheld(rounds, "evaluate", "auc")
            else '<p class="note">validation AUC per round: '
            + escape(_withheld_note(rounds, "evaluate"))
            + " at every training site (small-count guard: the validation sets are smaller).</p>",
            "<h3>Held-out sites</h3>",
            _img(
                curves_figure(x, held, "metric", "held-out AUC and accuracy per round", (0, 1.02)),
                "held-out AUC and accuracy per round",
            )
            if held
            else '<p class="note">n/a: this run has no held-out sites.</p>',
        ]
    )
    return _section("curves", "Learning curves", body)


def roc_section(rounds: Rounds) -> str:
    number, per_site, _ = _final_holdout(rounds)
    if number is None:
        body = '<p class="note">n/a: this run has no held-out sites.</p>'
    else:
        uri = roc_figure(per_site, number)
        body = (
            _img(uri, "ROC curves")
            if uri
            else ('<p class="note">n/a: the history holds no ROC points (roc_fpr / roc_tpr).</p>')
        )
    return _section("roc", "ROC curves (held-out sites, final round)", body)


def _validation(train: Mapping[str, Any], evaluate: Mapping[str, Any]) -> Mapping[str, Any]:
    """A training site's validation metrics: its evaluation reply's when the server ran an
    evaluation (the usual case), else what it reported beside its training (val_loss, num_val)."""
    if evaluate:
        return evaluate
    withheld = train.get("suppressed")
    renamed = {"val_loss": "loss", "val_auc": "auc"}
    return {"num-examples": train.get("num_val"), "loss": train.get("val_loss"),
            "auc": train.get("val_auc"), "min_patients": train.get("min_patients"),
            "suppressed": [renamed.get(k, k) for k in withheld] if isinstance(withheld, list) else []}


def sites_section(rounds: Rounds) -> str:
    parts = []
    number, per_site, _ = _final_holdout(rounds)
    if number is not None and per_site:
        sites = list(per_site)
        # Metrics along x and one colour per site: readable for one site or several.
        bars = {s: [finite_or_nan(per_site[s].get(k)) for k in METRIC_KEYS] for s in sites}
        # A lone series gets no legend, so name its site in the title.
        title = sites[0] if len(sites) == 1 else "per site"
        parts += [
            f"<h3>Held-out sites, round {number}</h3>",
            _img(
                bars_figure(METRIC_KEYS, bars, "metric", f"held-out metrics, {title}", (0, 1.05)),
                "held-out metrics per site",
            ),
        ]
    else:
        parts.append('<p class="note">Held-out sites: n/a (none in this run).</p>')

    if rounds:
        last = rounds[-1]
        number = _round_numbers(rounds)[-1]
        train = last.train
        sites = list(dict.fromkeys([*train, *last.evaluate]))
        if sites:
            validation = {s: _validation(train.get(s, {}), last.evaluate.get(s, {})) for s in sites}
            loss = [finite_or_nan(train.get(s, {}).get("train_loss")) for s in sites]
            auc = [finite_or_nan(validation[s].get("auc")) for s in sites]
            table_rows = []
            for s in sites:
                t, e = train.get(s, {}), validation[s]
                table_rows.append(
                    [
                        s,
                        format_metric("n", t.get("num-examples")),
                        metric_text(t, "train_loss"),
                        format_metric("n", e.get("num-examples")),
                        metric_text(e, "loss"),
                        metric_text(e, "auc"),
                        format_metric("epsilon", t.get("epsilon")),
                    ]
                )
            header = ["site", "train patients", "train loss", "val patients", "val loss", "val AUC",
                      "DP epsilon"]
            if not any("epsilon" in train.get(s, {}) for s in sites):  # no site trains with DP
                header, table_rows = header[:-1], [row[:-1] for row in table_rows]
            parts += [
                f"<h3>Training sites, round {number}</h3>",
                _img(train_sites_figure(sites, loss, auc, number), "training sites"),
                _html_table(header, table_rows),
            ]
    return _section("sites", "Per-site results", "\n".join(parts))


def communication_section(rounds: Rounds) -> str:
    x = _round_numbers(rounds)
    sent = _series(rounds, "bytes_sent")
    received = _series(rounds, "bytes_received")
    wall = _series(rounds, "wall_seconds")
    table = _html_table(
        ["round", "wall time", "bytes sent", "bytes received"],
        [
            [str(n), format_seconds(w), format_bytes(s), format_bytes(r)]
            for n, w, s, r in zip(x, wall, sent, received, strict=True)
        ],
    )
    body = _img(communication_figure(x, sent, received, wall), "communication per round") + table
    return _section("communication", "Communication", body)


def failures_section(rounds: Rounds) -> str:
    items = []
    for number, r in zip(_round_numbers(rounds), rounds, strict=True):
        failures = r.failures
        if failures:
            entries = "".join(f'<li class="fail">{escape(f)}</li>' for f in failures)
            items.append(f"<li>round {number}<ul>{entries}</ul></li>")
    body = f"<ul>{''.join(items)}</ul>" if items else "<p>No failures recorded.</p>"
    return _section("failures", "Failures", body)


def comparison_section(comparison: Mapping[str, Any] | None) -> str:
    if not comparison:
        return ""
    rows = comparison_rows(comparison)
    if not rows:
        return ""
    names = list(rows)
    auc = [finite_or_nan(rows[n].get("auc")) for n in names]
    # One colour per kind of setup, all local/<site> baselines sharing grey.
    palette = {"federated": "C0", "pooled": "C1", "local_mean": "C2"}
    colors = [palette.get(n, "C7") for n in names]
    uri = bars_figure(
        names, {"AUC": auc}, "AUC", "held-out AUC by training setup", (0, 1.05), colors
    )
    paired = format_paired_difference(comparison)
    body = (
        _metric_table(rows, table_keys(rows), "setup")
        + (f"<p>{escape(paired)}</p>" if paired else "")
        + _img(uri, "AUC by training setup")
    )
    return _section("comparison", "Federated vs pooled vs local", body)

