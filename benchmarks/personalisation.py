"""Personal models per hospital (issue 24): for every TRAINING site, on that site's own
test patients, the local-only model, the global federated model and each personalisation
method, with paired differences.

    python benchmarks/personalisation.py --datasets fashion ucsb --seeds 0 1 2 \
        --work /tmp/pers --out benchmarks/results/personalisation

Per dataset and training seed, one ``micromil compare --personalise local-head`` run gives
the local-only, pooled and federated models and the local-head personal models (local-head
leaves the global model as plain FedAvg gives it). ``finetune`` and ``proximal`` are then
made from that same final global model at each site with ``personalise_checkpoint`` (what
``flower-client personalise`` runs; the same seed and choice as a federation's last
message). Every personal model is chosen without the site's test patients (finetune and
proximal by k-fold CV over its training and validation patients, ``federation.personal_folds``;
local-head on its validation patients); the test patients are read only here, to judge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from federation import DATASETS, ROOT, micromil, prepared, write_results  # noqa: E402

from micromil_core.config import PERSONAL_METHODS as METHODS  # noqa: E402
from micromil_core.config import PERSONAL_RULES  # noqa: E402
from micromil_core.training.metrics import OWN_PATIENT_DIFFERENCES, OWN_PATIENT_MODELS  # noqa: E402


def personal_models(run: Path, data: Path, method: str, rule: str) -> dict[str, Path]:
    """Each training site's personal model of ``method`` from the run's global model, the
    CV choice made under ``rule`` (``federation.personal_rule``; models are kept under the
    work folder, so another rule needs another ``--work``)."""
    from micromil_core.data.data_root import read_sites_yaml
    from micromil_core.federated.personalise import personalise_checkpoint
    from micromil_core.federated.site_task import SiteSettings

    root = read_sites_yaml(data)
    models = {}
    for path in root.train_sites:
        out = run / "personal" / method / f"{path.name}.pt"
        if not out.is_file():
            site = SiteSettings(path.name, path, "train", state_dir=run / "personal" / method / "state" / path.name)
            personalise_checkpoint(run / "federated" / "model.pt", site, out, method,
                                   [f"federation.personal_rule={rule}"])
        models[path.name] = out
    return models


def judged(run: Path, data: Path, method: str, data_cfg, rule: str) -> dict:
    """The own-patient table of ``method`` (local-head: the compare run's own)."""
    from micromil_core.training.compare import own_patients_comparison

    if method == "local-head":
        return json.loads((run / "metrics.json").read_text())["own_patients"]
    table_file = run / "personal" / method / "own-patients.json"
    if table_file.is_file():
        return json.loads(table_file.read_text())
    personal = personal_models(run, data, method, rule)
    models = {site: {"local": run / "local" / site / "model.pt", "global": run / "federated" / "model.pt",
                     "personalised": path} for site, path in personal.items()}
    from micromil_core.data.data_root import read_sites_yaml

    sites = {p.name: p for p in read_sites_yaml(data).train_sites}
    table = own_patients_comparison(sites, models, run / "personal" / method / "judged", data_cfg)
    table_file.write_text(json.dumps(table, indent=1))
    return table


# A positive control (not one of issue 24's datasets): the Fashion federation, with one
# hospital whose labels mean the opposite of the others' (the same images read under another
# convention; a concept shift, P(y | x) differs by site). Label skew and the image shift change
# nothing a site's AUC can see that the global model cannot learn, so there personalisation has
# nothing to gain; here it has, at the flipped site, and this shows whether each method takes
# it. Site-1 is flipped because it has >= 5 test patients of each class (judgeable), chosen
# before any run; the held-out site and the other hospitals keep their labels.
FLIPPED = {"fashion-flip": ("fashion", "site-1")}


def prepared_data(key: str, work: Path) -> Path:
    """The data root of ``key``: prepared by ``micromil datasets prepare``, or (FLIPPED) a
    copy of its base root with one site's labels swapped (images hard-linked, not copied)."""
    if key not in FLIPPED:
        return prepared(key, DATASETS, work)
    import os
    import shutil
    import tempfile

    import yaml

    base_key, site = FLIPPED[key]
    out = work / "data" / key
    if not (out / "sites.yaml").is_file():
        base = prepared(base_key, DATASETS, work)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=out.parent))
        shutil.copytree(base, tmp / "root", copy_function=os.link)
        patients = tmp / "root" / site / "patients.csv"
        lines = patients.read_text().splitlines()
        swap = {"negative": "positive", "positive": "negative"}
        rows = [lines[0]] + [",".join([pid, swap[label], *rest]) for pid, label, *rest
                             in (line.split(",") for line in lines[1:])]
        patients.unlink()  # a hard link to the base root's file: write a new one
        patients.write_text("\n".join(rows) + "\n")
        info = yaml.safe_load((tmp / "root" / "sites.yaml").read_text())
        counts = info["site_class_counts"][site]
        counts["negative"], counts["positive"] = counts["positive"], counts["negative"]
        info["dataset"] += f" ({site}'s labels swapped)"
        (tmp / "root" / "sites.yaml").unlink()
        (tmp / "root" / "sites.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        (tmp / "root").rename(out)
        tmp.rmdir()
    return out


def config_of(key: str) -> str:
    return DATASETS[FLIPPED[key][0] if key in FLIPPED else key][2]


def run_dataset(key: str, seeds: list[int], work: Path, rounds: int | None, rule: str) -> list[dict]:
    from micromil_core.config import load_config

    data = prepared_data(key, work)
    config = config_of(key)
    data_cfg = load_config(ROOT / config).data  # as compare judges its own models
    rows = []
    for seed in seeds:
        run = work / f"{key}-seed{seed}"
        if not (run / "metrics.json").is_file():
            args = ["compare", "--config", str(ROOT / config), "--data-root", str(data),
                    "--personalise", "local-head", "--seed", str(seed), "--out", str(run), "--overwrite"]
            micromil(*args, *(["--rounds", str(rounds)] if rounds else []))
        for method in METHODS:
            table = judged(run, data, method, data_cfg, rule)
            for site, row in table["per_site"].items():
                rows.append({"dataset": key, "seed": seed, "method": method, "site": site, **row,
                             "epoch": chosen_epoch(work, key, seed, method, site),
                             "smaller_class": smaller_class(work, key, seed, method, site)})
            rows.append({"dataset": key, "seed": seed, "method": method, "site": "mean",
                         **{f"mean_{d}": table[f"mean_{d}"] for d in OWN_PATIENT_DIFFERENCES}})
    return rows


def smaller_class(work: Path, key: str, seed: int, method: str, site: str) -> int:
    """Test patients of the site's smaller class (0: one class only), from the judged labels."""
    from micromil_core.training.compare import read_predictions

    _, labels, _ = read_predictions(_judged_dir(work, key, seed, method) / site / "global" / "predictions.csv")
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    return int(counts.min())


# A paired AUC interval over fewer test patients of a class says little: the bootstrap,
# stratified by class, redraws a lone patient of the smaller class every time, so the
# interval shows only the larger class's spread. As the product's small-count guard, 5.
JUDGE_MIN_PER_CLASS = 5


def _judged_dir(work: Path, key: str, seed: int, method: str) -> Path:
    run = work / f"{key}-seed{seed}"
    return run / "own-patients" if method == "local-head" else run / "personal" / method / "judged"


def over_seeds(work: Path, rows: list[dict], min_per_class: int = 0) -> dict[tuple[str, str], dict]:
    """Per (dataset, method): personalised - global and - local averaged over sites AND
    training seeds, each site's test patients (the same in every seed) resampled once per
    bootstrap draw for all seeds (``mean_paired_difference`` with runs stacked); only the
    sites with at least ``min_per_class`` test patients of each class."""
    from micromil_core.training.compare import paired_predictions
    from micromil_core.training.metrics import mean_paired_difference

    out = {}
    for key, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        cells = [r for r in rows if r["dataset"] == key and r["method"] == method and r["site"] != "mean"]
        seeds = sorted({r["seed"] for r in cells})
        result = {}
        for diff, other in OWN_PATIENT_DIFFERENCES.items():
            groups = []
            for site in sorted({r["site"] for r in cells if r.get("smaller_class", 0) >= min_per_class}):
                runs = [paired_predictions(_judged_dir(work, key, s, method) / site / "personalised" / "predictions.csv",
                                           _judged_dir(work, key, s, method) / site / other / "predictions.csv")
                        for s in seeds]
                groups.append((runs[0][0], np.stack([r[1] for r in runs]), np.stack([r[2] for r in runs])))
            result[diff] = mean_paired_difference(groups)
        out[(key, method)] = result
    return out


def _ci(d: dict | None, key: str = "auc") -> str:
    if not d or d.get(key) is None:
        return "n/a"
    v = d[key]
    return f"{v['difference']:+.3f} ({v['low']:+.3f} to {v['high']:+.3f})"


def summary(rows: list[dict], metric: str, pooled: dict, judgeable: dict) -> list[str]:
    """Per dataset and method: mean AUCs over sites and seeds, the mean differences over
    sites and seeds (and per seed), and the sites below global."""
    lines = [f"| dataset | method | sites x seeds with an {metric} | local | global | personalised | "
             "personalised - global, mean over sites and seeds | per seed | personalised - local, "
             "over sites and seeds | per seed | sites below global (interval under 0) | of those, "
             f"with >= {JUDGE_MIN_PER_CLASS} test patients of each class | personalised - global, "
             f"mean over the sites with >= {JUDGE_MIN_PER_CLASS} of each class and seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys(r["dataset"] for r in rows):
        for method in METHODS:
            sites = [r for r in rows if r["dataset"] == key and r["method"] == method and r["site"] != "mean"]
            means = [r for r in rows if r["dataset"] == key and r["method"] == method and r["site"] == "mean"]
            ok = [r for r in sites if not np.isnan(_metric(r["personalised"], metric))]
            avg = {k: np.mean([_metric(r[k], metric) for r in ok]) if ok else float("nan")
                   for k in OWN_PATIENT_MODELS}
            below = [r for r in sites if (r["personalised_minus_global"] or {}).get(metric, {}).get("high", 0) < 0]
            judged = [r for r in below if r.get("smaller_class", 0) >= JUDGE_MIN_PER_CLASS]
            both = pooled[(key, method)]
            lines.append(
                f"| {key} | {method} | {len(ok)}/{len(sites)} | {avg['local']:.3f} | {avg['global']:.3f} | "
                f"{avg['personalised']:.3f} | {_ci(both['personalised_minus_global'], metric)} | "
                f"{'; '.join(_ci(m['mean_personalised_minus_global'], metric) for m in means)} | "
                f"{_ci(both['personalised_minus_local'], metric)} | "
                f"{'; '.join(_ci(m['mean_personalised_minus_local'], metric) for m in means)} | "
                f"{_cells(below)} | {_cells(judged)} | "
                f"{_ci((judgeable.get((key, method)) or {}).get('personalised_minus_global'), metric)} |"
            )
    return lines


def _cells(rows: list[dict]) -> str:
    return ", ".join(f"{r['site']}/s{r['seed']}" for r in rows) or "none"


def _metric(m: dict, key: str) -> float:
    v = m.get(key)
    return float("nan") if v is None else float(v)


def diversity(work: Path, rows: list[dict]) -> list[str]:
    """MicroMIL's representative diversity (distinct / min(N, K), mean over the site's test
    bags) of the global and the personal models: personalising must not collapse it."""
    lines = ["| dataset | method | global model | personal models | lowest personal |", "|---|---|---|---|---|"]
    for key in dict.fromkeys(r["dataset"] for r in rows):
        for method in METHODS:
            found = {"global": [], "personalised": []}
            for r in rows:
                if r["dataset"] != key or r["method"] != method or r["site"] == "mean":
                    continue
                base = _judged_dir(work, key, r["seed"], method)
                for kind in found:
                    path = base / r["site"] / kind / "metrics.json"
                    value = json.loads(path.read_text()).get("representative_diversity", {}).get("mean")
                    if value is not None:
                        found[kind].append(value)
            if found["personalised"]:
                lines.append(f"| {key} | {method} | {np.mean(found['global']):.3f} | "
                             f"{np.mean(found['personalised']):.3f} | {min(found['personalised']):.3f} |")
    return lines


def chosen_epoch(work: Path, key: str, seed: int, method: str, site: str) -> int | None:
    """The fine-tuning epoch count a site kept (0: the global model), from its personal
    model's checkpoint."""
    from micromil_core.training.checkpoint import load_checkpoint

    run = work / f"{key}-seed{seed}"
    if method == "local-head":  # made in the federation: under its own id in the site's state
        fed_id = json.loads((run / "federated" / "metrics.json").read_text())["personalised"]["federation_id"]
        found = [p for p in run.glob(f"**/site-state/{site}/personal/*/model.pt") if p.parent.name == fed_id]
    else:
        found = [p for p in [run / "personal" / method / f"{site}.pt"] if p.is_file()]
    return int(load_checkpoint(found[0]).provenance["personal_epoch"]) if found else None


def kept_global(rows: list[dict]) -> list[str]:
    """How often each method kept the global model (epoch 0), over sites and seeds."""
    lines = ["| dataset | method | global model kept (site x seed cells) |", "|---|---|---|"]
    for key, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        epochs = [r.get("epoch") for r in rows if r["dataset"] == key and r["method"] == method
                  and r["site"] != "mean"]
        lines.append(f"| {key} | {method} | {sum(e == 0 for e in epochs)}/{len(epochs)} |")
    return lines


def per_site(rows: list[dict]) -> list[str]:
    lines = ["| dataset | seed | method | site | n | smaller class | local AUC | global AUC | personalised AUC | "
             "personalised - global AUC (95% CI) | accuracy local / global / personalised | epoch kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["site"] == "mean":
            continue
        acc = " / ".join(f"{r[k]['accuracy']:.3f}" for k in OWN_PATIENT_MODELS)
        aucs = " | ".join("n/a" if np.isnan(_metric(r[k], "auc")) else f"{_metric(r[k], 'auc'):.3f}"
                          for k in OWN_PATIENT_MODELS)
        epoch = "?" if r.get("epoch") is None else str(r["epoch"])
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['method']} | {r['site']} | {r['global']['n']} | "
                     f"{r.get('smaller_class', '?')} | "
                     f"{aucs} | {_ci(r['personalised_minus_global'])} | {acc} | {epoch} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["fashion", "ucsb"], choices=sorted([*DATASETS, *FLIPPED]))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, help="default: the dataset config's (20)")
    ap.add_argument("--work", default="/tmp/personalisation")
    ap.add_argument("--out", default=str(HERE / "results" / "personalisation"))
    ap.add_argument("--personal-rule", default="one-se", choices=PERSONAL_RULES,
                    help="federation.personal_rule of finetune and proximal's CV choice")
    args = ap.parse_args()
    work = Path(args.work)
    rows = [r for key in args.datasets
            for r in run_dataset(key, args.seeds, work, args.rounds, args.personal_rule)]
    pooled = over_seeds(work, rows)
    judgeable = over_seeds(work, rows, JUDGE_MIN_PER_CLASS)
    command = ("python benchmarks/personalisation.py --datasets " + " ".join(args.datasets)
               + " --seeds " + " ".join(map(str, args.seeds))
               + (f" --rounds {args.rounds}" if args.rounds else "")
               + (f" --personal-rule {args.personal_rule}" if args.personal_rule != "one-se" else "")
               + f" --work {args.work} --out {args.out}")
    lines = [
        "# Personal models per hospital: each training site's own test patients",
        "",
        f"Command: `{command}`",
        "",
        "Every personal model is chosen without the site's test patients (the global model is one "
        "of the candidates): finetune and proximal by k-fold CV over the site's training and "
        f"validation patients (`federation.personal_folds`, 5; `personal_rule: {args.personal_rule}`), "
        "local-head on its validation "
        "patients; the site's test patients are read only to judge. Differences are paired "
        "(same patients), 95 % intervals by a bootstrap stratified by class; the mean over sites "
        "resamples each site's patients on its own. Sites whose test patients are all one class "
        "have no AUC and do not count in the AUC means. A site with fewer than "
        f"{JUDGE_MIN_PER_CLASS} test patients of a class (the product's small-count threshold) "
        "is judged on too few: the bootstrap, stratified by class, redraws a lone patient every "
        "time, so its interval shows only the other class's spread; the last two columns leave "
        "such sites out (which sites they are depends on the test labels only).",
        "",
        "## Summary (AUC)",
        "",
        *summary(rows, "auc", pooled, judgeable),
        "",
        "## Summary (accuracy)",
        "",
        *summary(rows, "accuracy", pooled, judgeable),
        "",
        "## How often the global model was kept",
        "",
        *kept_global(rows),
        "",
        "## MicroMIL's representatives (diversity on the sites' test bags)",
        "",
        *diversity(work, rows),
        "",
        "## Per site",
        "",
        *per_site(rows),
    ]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
