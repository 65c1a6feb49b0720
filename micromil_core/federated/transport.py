"""How a site's trained weights travel to the coordinator (``federation.transport``).

``float16`` halves the upload: the site sends its floating-point arrays as float16 and the
coordinator widens them back to the global model's dtype before checking and aggregating
them, so the strategies, the reply checks and the checkpoint never see float16. A weight
beyond float16's range (65,504) becomes infinite and the reply is refused as non-finite.
The global model is always sent at full precision.

Packing (deployments only): Flower moves every array of a message as its own objects, one
HTTP request each through SuperLink, SuperNode and ClientApp, and on a busy machine each
costs tens of milliseconds whatever its size. A model's arrays therefore travel packed,
one flat array per dtype plus a small layout that names each array, its dtype and shape;
the receiver unpacks them before anything else looks. Elementwise, nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch

from micromil_core.config import TRANSPORTS

__all__ = ["TRANSPORTS", "is_packed", "narrow", "pack_arrays", "unpack_arrays", "widen"]

PACKED = "packed/"  # key prefix of a packed model's arrays
LAYOUT = PACKED + "layout"


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


def is_packed(names) -> bool:
    """Whether an array record (or any collection of its keys) holds a packed model."""
    return LAYOUT in names


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` as one flat array per dtype (``packed/<dtype>``, in key order) and the
    layout (``packed/layout``: UTF-8 JSON of [name, dtype, shape] as uint8)."""
    layout, groups = [], {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        layout.append([name, arr.dtype.str, list(arr.shape)])
        groups.setdefault(arr.dtype.str, []).append(arr.reshape(-1))
    packed = {PACKED + dtype: np.concatenate(parts) for dtype, parts in groups.items()}
    packed[LAYOUT] = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()
    return packed


def unpack_arrays(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays :func:`pack_arrays` packed; ValueError naming what does not fit."""
    try:
        layout = json.loads(np.asarray(packed[LAYOUT], dtype=np.uint8).tobytes().decode())
        entries = [(str(name), np.dtype(dtype), tuple(int(n) for n in shape)) for name, dtype, shape in layout]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"packed arrays without a readable layout ({exc})") from None
    if any(n < 0 for _, _, shape in entries for n in shape):
        raise ValueError("packed arrays with a negative dimension in their layout")
    offsets = {dtype: 0 for dtype in {d.str for _, d, _ in entries}}
    out = {}
    for name, dtype, shape in entries:
        flat = packed.get(PACKED + dtype.str)
        if flat is None or flat.dtype != dtype:
            raise ValueError(f"packed arrays lack the {dtype} values of {name!r}")
        size = int(np.prod(shape, dtype=np.int64))
        start = offsets[dtype.str]
        if start + size > flat.size:
            raise ValueError(f"packed arrays end before {name!r} (shape {list(shape)})")
        out[name] = flat[start:start + size].reshape(shape)
        offsets[dtype.str] = start + size
    extra = sorted(k for k in packed if k != LAYOUT and k[len(PACKED):] not in offsets)
    short = [k for k, used in offsets.items() if packed[PACKED + k].size != used]
    if extra or short:
        raise ValueError(f"packed arrays do not match their layout ({', '.join(extra + short)})")
    return out
