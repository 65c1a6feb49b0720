"""How a site's trained weights travel to the coordinator (``federation.transport``).

``float16`` halves the upload: the site sends its floating-point arrays as float16 and the
coordinator widens them back to the global model's dtype before checking and aggregating
them, so the strategies, the reply checks and the checkpoint never see float16. A weight
beyond float16's range (65,504) becomes infinite and the reply is refused as non-finite.
The global model is always sent at full precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from micromil_core.config import TRANSPORTS

__all__ = ["TRANSPORTS", "narrow", "widen"]


def narrow(state: Mapping[str, torch.Tensor], transport: str) -> dict[str, torch.Tensor]:
    """A site's state dict as it is sent: float32 tensors as float16 under ``float16``."""
    if transport == "float32":
        return dict(state)
    return {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}


def widen(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A received update with each float16 array cast to its global array's float dtype;
    anything else (a wrong dtype a site should not have sent) is left for the checks."""
    out = {}
    for name, arr in update.items():
        ref = reference.get(name)
        if ref is not None and arr.dtype == np.float16 and np.issubdtype(ref.dtype, np.floating):
            arr = arr.astype(ref.dtype)
        out[name] = arr
    return out
