"""RMSNorm, weighted and unweighted, computed in float32 as DeepSeek-V4 does."""

from __future__ import annotations

import torch
from torch import nn

from moemesh.kernels import fast_paths


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, in float32."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight stays float32 and the product is cast once to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fast_paths.rms_norm(x, self.weight, self.eps)  # device kernel; None on the CPU
        return fast if fast is not None else (self.weight * rms_normalize(x, self.eps)).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight; the scale is computed in float32, the product in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
