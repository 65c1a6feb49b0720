"""Client-side clipping for central DP: Flower's clipping mods, run only when asked.

Flower's ``fixedclipping_mod``/``adaptiveclipping_mod`` answer with an error when the
round's config lacks the clipping norm that the server's client-side DP wrapper sends, so
attached as they are they would break every run without central DP. This mod calls the
one that matches the experiment's ``privacy.central.mode`` only when the norm is there.
Attach it to the train handler only (``@app.train(mods=[...])``): attached to the whole
ClientApp the clipping mods also intercept evaluate messages and fail them (Flower 1.41).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from micromil_core.federated import wire
from micromil_core.federated.messages import RoundSettings


def central_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip this site's update to the server's norm when the server asks for it."""
    config = msg.content.config_records.get(wire.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    mode = RoundSettings.from_config(config).experiment.privacy.central.mode
    clip = adaptiveclipping_mod if mode == "adaptive-clipping" else fixedclipping_mod
    return clip(msg, ctxt, call_next)
