"""Patient-weighted means of the sites' metrics, as the coordinator reports them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from micromil_core.federated import wire


def weighted_means(per_site: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    """Patient-weighted mean of each metric over the sites that report it (a site that
    withheld a metric, or reports NaN, is left out of that mean; NaN if none reports it).
    A hierarchical model's fine metrics are weighted by each site's fine-labelled patients.
    """
    sites = list(per_site)
    out: dict[str, float] = {}
    for key in keys:
        num = den = 0.0
        weight = wire.FINE_COUNT if key in wire.FINE_METRIC_KEYS else wire.NUM_EXAMPLES
        for m in sites:
            v, w = m.get(key), m.get(weight, 0)
            if isinstance(v, (int, float)) and math.isfinite(v) and w:
                num += v * w
                den += w
        out[key] = num / den if den else math.nan
    return out


def scalar_keys(per_site: Iterable[Mapping[str, Any]]) -> list[str]:
    """The numeric (non-list) metrics any site reports or withheld (by name), except the
    weighting key and the small-count guard's own markers."""
    sites = list(per_site)
    keys = {k for m in sites for k, v in m.items() if not isinstance(v, list)}
    keys |= {k for m in sites for k in m.get(wire.SUPPRESSED, []) if isinstance(k, str)}
    return sorted(keys - {wire.NUM_EXAMPLES} - wire.DISCLOSURE_METRICS)
