"""Partial, interleaved rotary position embedding (plain and YaRN), as DeepSeek-V4 uses it.

V4 rotates the *trailing* `rope_head_dim` channels of each head, pairing consecutive channels (0,1), (2,3), ...
Sliding layers use the `main` frequencies; CSA/HCA layers, their compressors and the indexer use `compress`
(a larger base, optionally YaRN-stretched, with cos/sin never rescaled).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moemesh.kernels.config import ModelConfig, RopeParams


def inv_freq(params: RopeParams, rope_dim: int) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] (float32) for one RoPE variant."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    pos_freqs = params.rope_theta ** exponents
    if params.rope_type == "default":
        return 1.0 / pos_freqs
    # YaRN: interpolate the low frequencies by `factor`, keep the high ones, blend on a linear ramp in between.
    factor, base, orig = params.factor, params.rope_theta, params.original_max_position_embeddings
    beta_fast, beta_slow = params.beta_fast or 32, params.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


class Rotary(nn.Module):
    """cos/sin tables for one RoPE variant; `cos_sin(positions)` -> two float32 tensors [..., rope_dim/2].

    A module (non-persistent buffer) so it follows the model's device; shared by every layer of its kind."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        params = cfg.rope(kind)
        self.register_buffer("inv_freq", inv_freq(params, cfg.rope_head_dim), persistent=False)
        self.scale = 1.0 if params.attention_factor is None else params.attention_factor

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] channels of x, pairs (2i, 2i+1) by angle i.

    x: [T, Dh] or [T, H, Dh] with cos/sin [T, R/2] (heads broadcast). Computed in
    float32, returned in x's dtype. Pass -sin to undo the rotation."""
    r = 2 * cos.shape[-1]
    if x.dim() == cos.dim() + 1:  # x has a heads axis: [T, H, Dh] against cos [T, R/2]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    nope, rope = x[..., :-r], x[..., -r:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated_half = torch.stack((-odd, even), dim=-1).flatten(-2)
    out = (rope * cos + rotated_half * sin).to(x.dtype)
    return torch.cat([nope, out], dim=-1)
