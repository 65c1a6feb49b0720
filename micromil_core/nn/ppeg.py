"""TransMIL's pyramid position encoding generator (PPEG, Shao et al., NeurIPS 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from micromil_core.nn._deferred import deferred

PPEG_KERNELS = (7, 5, 3)


class PPEG(nn.Module):
    """Pyramid position encoding generator: grid + dwconv7 + dwconv5 + dwconv3 (Shao et al.).

    Depth-wise convolutions over the tokens laid out on a square grid: each token gains an
    encoding of its neighbourhood; ``padding = k // 2`` keeps the grid's size.

    Shapes: grid (B, L, K, K) -> (B, L, K, K)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.convs = nn.ModuleList(
            deferred(nn.Conv2d, dim, dim, k, padding=k // 2, groups=dim) for k in PPEG_KERNELS
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's default Conv2d init, largest kernel first (the order they are built)."""
        for conv in self.convs:
            conv.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.dim}, kernels={PPEG_KERNELS}"

    def forward(self, grid: Tensor) -> Tensor:
        return grid + sum(conv(grid) for conv in self.convs)  # (B, L, K, K)
