"""Manifold-constrained hyper-connections (mHC): the residual is `hc` streams instead of one.

Before each sub-block a learned mix reads the streams: `pre` collapses them into the block's input, `post` spreads the
block's output back over the streams, and `comb` (projected to a doubly-stochastic matrix by Sinkhorn) mixes the old
streams into the new ones:  streams' = post ⊗ block(Σ pre·streams) + combᵀ · streams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels.config import ModelConfig
from moemesh.kernels.norms import unweighted_rms_norm


class HyperConnection(nn.Module):
    """Checkpoint tensors: `hc_{attn,ffn}_fn` [(2+hc)·hc, hc·D], `_base` [(2+hc)·hc], `_scale` [3]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = hc, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros(mix, hc * cfg.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [N, hc, D] -> post [N, hc] (f32), comb [N, hc, hc] (f32), collapsed [N, D] (streams' dtype)."""
        hc = self.hc
        mixes = F.linear(unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * s_comb + comb_b.view(hc, hc), dim=-1) + self.eps
        comb = sinkhorn(comb, self.iters, self.eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternate column/row normalisation towards a doubly-stochastic matrix (columns first, `iters` column steps)."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def merge_streams(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """streams [N, hc, D], block output out [N, D] -> post ⊗ out + combᵀ · streams  [N, hc, D]."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """Final collapse of the streams before the last norm. Tensors: `hc_head_fn` [hc, hc·D], `_base` [hc], `_scale`
    [1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros(hc, hc * cfg.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(hc, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [N, hc, D] -> [N, D]."""
        mixes = F.linear(unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps), self.fn.float())
        pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
