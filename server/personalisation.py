"""The federation's last exchange under ``federation.personalise``: every training site
makes its personal model from the final global model and keeps it (client.app's
``personalise`` handler, ``micromil_core.federated.personalise``). Only aggregate numbers
come back, screened like every other reply; a reply carrying arrays is refused."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from micromil_core.federated import wire
from micromil_core.report import metric_text
from server.rounds import match_replies, metric_dict, screen_replies

if TYPE_CHECKING:
    from server.federation import _Federation

log = logging.getLogger("micromil.server")

PERSONALISE_MESSAGE = f"{MessageType.TRAIN}.{wire.PERSONALISE_ACTION}"
MAX_WAIT_ROUNDS = 5  # the longest wait for personal models, in round timeouts


def personalise_sites(fed: _Federation, arrays: ArrayRecord, federation_id: str) -> dict[str, Any]:
    """Ask every connected training site for its personal model from ``arrays``; returns
    ``{"method", "per_site": {site: metrics}, "failures": [...]}`` for metrics.json."""
    cfg = fed.cfg.federation
    config = ConfigRecord({**fed.settings.to_config(), wire.ROUND: cfg.rounds + 1,
                           wire.FEDERATION_ID: federation_id})
    live = set(fed.grid.get_node_ids())
    sites = fed.train_sites
    messages = [
        Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=s.node_id,
                message_type=PERSONALISE_MESSAGE)
        for s in sites if s.node_id in live
    ]
    failures = [f"{s.name}: not connected" for s in sites if s.node_id not in live]
    log.info("personalisation (%s): %d training sites make their own model", cfg.personalise, len(messages))
    # Fine-tuning runs up to personal_epochs epochs: a longer wait than one round's, within reason.
    timeout = cfg.round_timeout * min(MAX_WAIT_ROUNDS, max(1, math.ceil(cfg.personal_epochs / cfg.local_epochs)))
    replies = list(fed.grid.send_and_receive(messages, timeout=timeout))
    answered, lost = match_replies(messages, replies, {s.node_id: s.name for s in sites},
                                   "personalisation", timeout)
    max_epoch = max(cfg.personal_epochs, cfg.local_epochs)  # DP sites run local_epochs
    usable, _, refused = screen_replies(
        answered, lambda site, r: fed.checks.personal_problem(site, r, max_epoch), "personalisation")
    per_site = {name: metric_dict(r.content.metric_records[wire.METRICS]) for name, r in usable}
    for name, m in per_site.items():
        log.info("personalisation: %s validation AUC global %s -> personal %s (epoch %s)", name,
                 metric_text(m, "val_auc_global"), metric_text(m, "val_auc_personal"),
                 m.get("personal_epoch", "withheld"))
    for f in failures + lost + refused:
        log.warning("personalisation: %s", f)
    return {"method": cfg.personalise, "federation_id": federation_id, "per_site": per_site,
            "failures": failures + lost + refused}
