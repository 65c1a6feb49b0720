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

    Built on the meta device, then each tensor allocated afresh: ``nn.utils.skip_init``
    does the same through ``Module.to_empty``, whose meta-tensor path imports sympy
    (~0.3 s in every process that builds a model, paid at a federation's start-up).
    """
    module = module_cls(*args, device="meta", **kwargs)
    device = torch.get_default_device()
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(sub, name, nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    return module
