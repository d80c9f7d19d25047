"""KV compressors of CSA and HCA layers, and CSA's lightning indexer.

A compressor turns every `rate` tokens into one entry: a softmax-gated (per channel) sum of the window's projected
tokens, RMS-normed, rotated at the window's first position. HCA windows are disjoint. CSA windows overlap: each token
projects two series (a, b); entry w mixes series a of window w-1 with series b of window w (width 2·rate, stride rate).
Shapes: T = new tokens of one sequence, D = hidden, W = width of the projections, Do = entry width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels.config import ModelConfig
from moemesh.kernels.decode_state import CompressorState, GrowableRows
from moemesh.kernels.norms import RMSNorm
from moemesh.kernels.rope import Rotary, apply_rope


class Compressor(nn.Module):
    """Tensors: `wkv.weight`, `wgate.weight` [W, D], `ape` [rate, W], `norm.weight` [Do]; W = 2·Do if overlapping."""

    def __init__(self, cfg: ModelConfig, rate: int, out_dim: int, overlap: bool, rotary: Rotary):
        super().__init__()
        width = (2 if overlap else 1) * out_dim
        self.rate, self.out_dim, self.overlap, self.rotary = rate, out_dim, overlap, rotary
        self.wkv = nn.Linear(cfg.hidden_size, width, bias=False)
        self.wgate = nn.Linear(cfg.hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, width, dtype=torch.float32))
        self.norm = RMSNorm(out_dim, cfg.rms_norm_eps)

    def new_state(self, dtype: torch.dtype, device) -> CompressorState:
        return CompressorState(entries=GrowableRows(self.out_dim, dtype, device))

    def update(self, x: torch.Tensor, state: CompressorState) -> None:
        """Feed one sequence's next tokens x [T, D]; closes every completed window into `state.entries`."""
        kv, gate = self.wkv(x), self.wgate(x)  # [T, W]
        if state.buf_kv is not None:
            kv, gate = torch.cat([state.buf_kv, kv]), torch.cat([state.buf_gate, gate])
        usable = (kv.shape[0] // self.rate) * self.rate
        state.buf_kv, state.buf_gate = kv[usable:], gate[usable:]
        if usable == 0:
            return
        n = usable // self.rate
        kv = kv[:usable].view(n, self.rate, -1)
        gate = gate[:usable].view(n, self.rate, -1) + self.ape.to(gate.dtype)
        if self.overlap:
            kv, gate = self._overlap_windows(kv, gate, state)
        mixed = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1)  # [n, Do]
        first = state.count * self.rate
        positions = torch.arange(n, device=x.device) * self.rate + first
        cos, sin = self.rotary.cos_sin(positions)
        state.entries.append(apply_rope(self.norm(mixed), cos, sin))

    def _overlap_windows(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState):
        """[n, rate, 2·Do] -> [n, 2·rate, Do]: slots [:rate] = series a of the previous window, [rate:] = series b.

        Window 0 takes series a of the last window closed by an earlier call; on a sequence's first window there is
        none, and those slots get gate -inf (weight 0)."""
        n, r, Do = kv.shape[0], self.rate, self.out_dim
        wide_kv = kv.new_zeros(n, 2 * r, Do)
        wide_gate = gate.new_full((n, 2 * r, Do), float("-inf"))
        wide_kv[:, r:], wide_gate[:, r:] = kv[..., Do:], gate[..., Do:]
        wide_kv[1:, :r], wide_gate[1:, :r] = kv[:-1, :, :Do], gate[:-1, :, :Do]
        if state.overlap_kv is not None:
            wide_kv[0, :r], wide_gate[0, :r] = state.overlap_kv, state.overlap_gate
        state.overlap_kv, state.overlap_gate = kv[-1, :, :Do].clone(), gate[-1, :, :Do].clone()
        return wide_kv, wide_gate


class Indexer(nn.Module):
    """Lightning indexer: score(t, s) = Σ_h w_{t,h} · relu(q_{t,h} · k_s), keep the top `index_topk` entries.

    Tensors: `compressor.*` (its own overlapping compressor at index_head_dim), `wq_b.weight` [Hi·Di, q_lora],
    `weights_proj.weight` [Hi, D]."""

    def __init__(self, cfg: ModelConfig, rate: int, rotary: Rotary):
        super().__init__()
        self.heads, self.head_dim, self.topk, self.rate = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, rate
        self.rotary = rotary
        self.compressor = Compressor(cfg, rate, cfg.index_head_dim, overlap=True, rotary=rotary)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.heads, bias=False)

    def select(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor,
               state: CompressorState) -> torch.Tensor:
        """x [T, D], q_residual [T, q_lora], positions [T] -> bool mask [T, S] of the compressed entries each query
        may attend to (its top-k among the entries already complete at its position)."""
        self.compressor.update(x, state)
        keys = state.entries.view()  # [S, Di]
        T, S = x.shape[0], keys.shape[0]
        visible = torch.zeros(T, S, dtype=torch.bool, device=x.device)
        if S == 0:
            return visible
        cos, sin = self.rotary.cos_sin(positions)
        q = apply_rope(self.wq_b(q_residual).view(T, self.heads, self.head_dim), cos, sin)
        scores = F.relu(torch.einsum("thd,sd->ths", q.float(), keys.float())) * self.head_dim ** -0.5
        w = self.weights_proj(x).float() * self.heads ** -0.5  # [T, Hi]
        scores = (scores * w.unsqueeze(-1)).sum(dim=1)  # [T, S]
        complete = torch.arange(S, device=x.device) < ((positions + 1) // self.rate).unsqueeze(-1)  # [T, S]
        top = topk_lower_index_first(scores.masked_fill(~complete, float("-inf")), min(self.topk, S))
        visible.scatter_(1, top, True)
        return visible & complete


def topk_lower_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores [T, S] -> [T, k], exact ties going to the lower index.

    torch.topk's pick among equal scores is unspecified and changes with S: the indexer's scores tie often (relu
    makes 0 common), so a prefill split into chunks (smaller pools when its queries run) would select other entries
    than a whole one. Here every score becomes a unique int64 key, (order-preserving bits of the float32 score) · 2^32
    + (S-1-index), and topk over unique keys has one answer. About 2x torch.topk on the CPU; a stable sort is 4-13x."""
    S = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 ties with 0.0
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    lower_first = S - 1 - torch.arange(S, device=scores.device)
    return (key * (1 << 32) + lower_first).topk(k, dim=-1).indices
