"""The wire contract between the server and the sites, named once.

Privacy rule: a reply carries model weights and AGGREGATE numbers only (counts, means,
metrics over all of a site's patients, ROC points on a fixed grid). No patient id,
per-patient score, image or feature ever leaves a site. ``tests/`` inspects every message
against the allow-lists below.
"""

from __future__ import annotations

import numpy as np

from micromil_core.training.metrics import FINE_METRIC_KEYS, METRIC_KEYS

# RecordDict keys
ARRAYS = "arrays"  # the global/local model weights (Flower's default key)
CONFIG = "config"  # per-message settings from the server
METRICS = "metrics"  # aggregate numbers from a site
SCALER = "scaler"  # server -> site: global feature standardisation (mean, std)
MOMENTS = "moments"  # site -> server: summed feature moments (sum, sum of squares)
SITE = "site"  # site -> server: site description (name, role, classes)

# The final message of a personalising federation (Flower message type "train.personalise"):
# each training site makes its personal model from the global one and keeps it.
PERSONALISE_ACTION = "personalise"

# Config keys sent by the server (ConfigRecord)
ROUND = "server-round"
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx sends this key
EVAL_SPLIT = "eval-split"
# A random id the coordinator draws once per federation run (kept across its restarts):
# a site's privacy ledger accounts DP-SGD per run id.
FEDERATION_ID = "federation-id"
# Secure aggregation: the model's array names, in order (Flower's legacy record that
# SecAgg+ travels in keeps the arrays but not their names).
ARRAY_KEYS = "array-keys"

# Site description (ConfigRecord: strings and lists of strings only)
SITE_NAME = "site-name"
SITE_ROLE = "role"
SITE_CLASSES = "classes"
SITE_PROBLEMS = "problems"  # check-site errors with patient ids and file names redacted
# The encoder behind the site's features (encoders.base.identity_label: cache id + weights
# SHA-256; absent for precomputed features): sites with different ones are refused.
SITE_ENCODER = "encoder"
# A training site's own DP-SGD setting ("dp-sgd" or "none"): the coordinator refuses before
# round 1 what such a site would refuse in every round (federation.personalise: local-head).
SITE_PRIVACY = "privacy"

NUM_EXAMPLES = "num-examples"  # Flower's weighting key: patients (bags), not instances

ROC_GRID = np.linspace(0.0, 1.0, 21)  # FPR grid: a site's ROC is shared only as these points

CORE_METRICS = METRIC_KEYS  # the patient-level metrics every command reports

# Every key a site may put in a MetricRecord. Anything else is a privacy bug.
# Local DP: the site's settings and the epsilon it has spent in this run (no data).
DP_METRICS = frozenset(
    {"epsilon", "delta", "epsilon_budget", "epsilon_next", "noise_multiplier", "sample_rate",
     "max_grad_norm", "dp_steps"}
)
# Central DP with client-side adaptive clipping: 1 if this round's update was clipped
# (Flower's KEY_NORM_BIT); the server adapts the clipping norm to the clipped fraction.
CENTRAL_DP_METRICS = frozenset({"norm_bit"})
# Small-count guard (privacy.disclosure): "suppressed" names the metrics a site withheld,
# computed over fewer patients than the threshold, as a bit mask over GUARDED_METRICS (one
# integer: records hold numbers only, and Flower's legacy SecAgg+ path no lists);
# "min_patients" is that threshold.
SUPPRESSED = "suppressed"
MIN_PATIENTS = "min_patients"
DISCLOSURE_METRICS = frozenset({SUPPRESSED, MIN_PATIENTS})
ALLOWED_TRAIN_METRICS = frozenset(
    {NUM_EXAMPLES, "train_loss", "val_loss", "num_val", "seconds"}
    | DISCLOSURE_METRICS
    | DP_METRICS
    | CENTRAL_DP_METRICS
    | {f"val_{k}" for k in CORE_METRICS}
)
# A site's AUC interval (bootstrap over its evaluation patients): two numbers, like the AUC.
AUC_INTERVAL = ("auc_ci_low", "auc_ci_high")
# Hierarchical (HMIL) models: fine-level metrics over the site's patients with a known
# fine label, and how many those are (the weight of the site's fine metrics).
FINE_COUNT = "fine_n"
# Every metric an evaluation reply may carry (each one subject to the small-count guard).
EVAL_METRIC_KEYS = (*CORE_METRICS, "loss", *AUC_INTERVAL, "roc_fpr", "roc_tpr", *FINE_METRIC_KEYS)
# Personalisation (federated/personalise.py): each training site's AUC of the global and of
# its personal model on the patients it chose by (mean over held folds under k-fold CV, else
# its validation patients), the fine-tuning epoch chosen (0 = global kept), and the folds.
PERSONAL_EPOCH = "personal_epoch"
NUM_VAL = "num_val"  # the patients a site chose its personal model on
PERSONAL_FOLDS = "personal_folds"  # k of the k-fold CV that chose it (absent: the validation split)
# The folds are withheld with the rest: fewer than asked is the smaller class's patient count.
PERSONAL_METRIC_KEYS = ("val_auc_global", "val_auc_personal", PERSONAL_EPOCH, PERSONAL_FOLDS)
# append only: indices travel on the wire
GUARDED_METRICS = (*EVAL_METRIC_KEYS, "train_loss", *PERSONAL_METRIC_KEYS)
ALLOWED_EVAL_METRICS = frozenset({NUM_EXAMPLES, FINE_COUNT, *EVAL_METRIC_KEYS} | DISCLOSURE_METRICS)
# A personalise reply: aggregate numbers only; the personal model stays at the site.
ALLOWED_PERSONAL_METRICS = frozenset(
    {NUM_EXAMPLES, NUM_VAL, "seconds", *PERSONAL_METRIC_KEYS} | DISCLOSURE_METRICS | DP_METRICS
)
ALLOWED_SITE_METRICS = frozenset(
    {NUM_EXAMPLES, "feature_dim", "num_train", "num_val", "num_test", "num_instances",
     "num_errors", "num_warnings"}
    | {f"class_count_{i}" for i in range(64)}
)
