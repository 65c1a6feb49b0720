"""A site's DP settings as Flower node-config entries (``privacy-<key>``) and back.

``flower-client run`` writes them from the ``privacy:`` section of the hospital's site.yaml;
the ClientApp reads them. They never travel to the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from micromil_core.config import LocalPrivacyConfig, build_section

PREFIX = "privacy-"


# Not DP-SGD settings: the small-count guard applies with DP off too.
DISCLOSURE_FIELDS = ("min_patients", "allow_small_counts")


def to_node_config(privacy: LocalPrivacyConfig) -> dict[str, Any]:
    """Node-config entries for ``privacy``: the DP-SGD keys when DP is on, the small-count
    guard's whenever they differ from the defaults."""
    default = LocalPrivacyConfig()
    return {
        PREFIX + f.name.replace("_", "-"): getattr(privacy, f.name)
        for f in fields(privacy)
        if privacy.enabled
        or (f.name in DISCLOSURE_FIELDS and getattr(privacy, f.name) != getattr(default, f.name))
    }


def from_node_config(node_config: Mapping[str, Any]) -> LocalPrivacyConfig:
    """The site's ``LocalPrivacyConfig`` from its node config (validated as in site.yaml)."""
    values = {
        key[len(PREFIX):].replace("-", "_"): value
        for key, value in node_config.items()
        if str(key).startswith(PREFIX)
    }
    return build_section("privacy", LocalPrivacyConfig, values)
