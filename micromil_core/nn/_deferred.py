"""Build a torch submodule with its parameters allocated but not yet drawn."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def deferred(module_cls: type[M], *args: Any, **kwargs: Any) -> M:
    """``module_cls(*args, **kwargs)`` whose parameters hold no values yet.

    A layer of this package builds its submodules this way and then calls its own
    ``reset_parameters()``, which draws every parameter exactly once, in the order the
    submodules' constructors used to: a torch seed therefore gives the same weights as
    before the layers had ``reset_parameters`` (checkpoints and seeded runs stay
    reproducible). Lands on torch's default device, as a plain constructor would.
    """
    return nn.utils.skip_init(module_cls, *args, device=torch.get_default_device(), **kwargs)
