"""The federation's last exchange under ``federation.personalise``: every training site
makes its personal model from the final global model and keeps it (client.site_app's
``personalise`` handler, ``micromil_core.federated.personalise``). Only aggregate numbers
come back, screened like every other reply; a reply carrying arrays is refused."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.app.message_type import MessageType

from micromil_core.federated import wire
from micromil_core.federated.personalise import FINE_TUNING
from micromil_core.report.personal import choice_criterion, choice_line
from server.rounds import ask_sites

if TYPE_CHECKING:
    from server.federation import _Federation

log = logging.getLogger("micromil.server")

PERSONALISE_MESSAGE = f"{MessageType.TRAIN}.{wire.PERSONALISE_ACTION}"
MAX_WAIT_ROUNDS = 5  # the longest wait for personal models, in round timeouts per fine-tuning run


def personalise_sites(fed: _Federation, arrays: ArrayRecord, federation_id: str) -> dict[str, Any]:
    """Ask every connected training site for its personal model from ``arrays``; returns
    ``{"method", "per_site": {site: metrics}, "failures": [...]}`` for metrics.json."""
    cfg = fed.cfg.federation
    config = ConfigRecord({**fed.settings.to_config(), wire.ROUND: cfg.rounds + 1,
                           wire.FEDERATION_ID: federation_id})
    log.info("personalisation (%s): the training sites make their own model", cfg.personalise)
    # Fine-tuning runs up to personal_epochs epochs, once per CV fold and once more on all the
    # site's patients: a longer wait than one round's, within reason.
    runs = 1 + (cfg.personal_folds if cfg.personalise in FINE_TUNING else 0)
    epochs = cfg.personal_epochs * runs
    timeout = cfg.round_timeout * min(MAX_WAIT_ROUNDS * runs, max(1, math.ceil(epochs / cfg.local_epochs)))
    max_epoch = max(cfg.personal_epochs, cfg.local_epochs)  # DP sites run local_epochs
    per_site, failures, _, _, _ = ask_sites(
        fed.grid, fed.train_sites, RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}),
        PERSONALISE_MESSAGE, timeout, "personalisation",
        lambda site, r: fed.checks.personal_problem(site, r, max_epoch, cfg.personal_folds),
    )
    chosen_by = choice_criterion(fed.cfg.train.select_on, fed.cfg.train.class_weighting)
    for name, m in per_site.items():
        log.info("personalisation: %s", choice_line(name, m, chosen_by))
    for f in failures:
        log.warning("personalisation: %s", f)
    return {"method": cfg.personalise, "federation_id": federation_id, "per_site": per_site,
            "chosen_by": chosen_by, "rule": cfg.personal_rule, "failures": failures}
