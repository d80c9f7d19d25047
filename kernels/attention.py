"""DeepSeek-V4 hybrid attention: a sliding window over one shared K=V head, plus compressed entries (CSA: top-k of
a 4:1 overlapping compression picked by the lightning indexer; HCA: all of a 128:1 compression), a learnable sink per
head, partial RoPE undone on the output, and a grouped low-rank output projection.

Shapes: N = tokens of the step (all sequences), T = tokens of one sequence, H = heads, Dh = head_dim, D = hidden,
S = keys (window + compressed entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import fast_paths
from moemesh.kernels.compressor import Compressor, Indexer
from moemesh.kernels.config import CSA, SLIDING, ModelConfig
from moemesh.kernels.decode_state import LayerCache
from moemesh.kernels.norms import RMSNorm, unweighted_rms_norm
from moemesh.kernels.rope import Rotary, apply_rope


@dataclass
class Segment:
    """The tokens [start, start+length) of the step's flat batch that belong to one sequence, and its state."""

    start: int
    length: int
    cache: "object"  # SequenceCache

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.length)


class Attention(nn.Module):
    """Tensors (prefix `attn.`): wq_a, q_norm, wq_b, wkv, norm, wo_a, wo_b, attn_sink, [compressor.*], [indexer.*]."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: dict[str, Rotary]):
        super().__init__()
        D, H, Dh, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
        self.layer, self.kind = layer, cfg.layer_types[layer]
        self.heads, self.head_dim, self.window, self.eps = H, Dh, cfg.sliding_window, cfg.rms_norm_eps
        self.groups = cfg.o_groups
        self.rotary = rotary["main" if self.kind == SLIDING else "compress"]
        self.wq_a = nn.Linear(D, ql, bias=False)
        self.q_norm = RMSNorm(ql, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(ql, H * Dh, bias=False)
        self.wkv = nn.Linear(D, Dh, bias=False)
        self.norm = RMSNorm(Dh, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(H * Dh // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.compressor = self.indexer = None
        if self.kind != SLIDING:
            rate = cfg.compress_rate(layer)
            self.compressor = Compressor(cfg, rate, Dh, overlap=self.kind == CSA, rotary=rotary["compress"])
            if self.kind == CSA:
                self.indexer = Indexer(cfg, rate, rotary["compress"])

    def new_cache(self, dtype: torch.dtype, device) -> LayerCache:
        cache = LayerCache(window=torch.empty(0, self.head_dim, dtype=dtype, device=device))
        if self.compressor is not None:
            cache.compressor = self.compressor.new_state(dtype, device)
        if self.indexer is not None:
            cache.indexer = self.indexer.compressor.new_state(dtype, device)
        return cache

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """x [N, D] (normed block input), positions [N] -> [N, D]; advances each segment's cache of this layer."""
        N = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions)
        q_residual = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(q_residual).view(N, self.heads, self.head_dim), self.eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.norm(self.wkv(x)), cos, sin)  # [N, Dh]
        out = torch.empty_like(q)
        for seg in segments:
            s = seg.slice
            out[s] = self._attend(x[s], q[s], kv[s], q_residual[s], positions[s], seg.cache.layers[self.layer])
        out = apply_rope(out, cos, -sin)  # K=V carried rotation into the output: undo it at the query position
        grouped = out.reshape(N, self.groups, -1)  # [N, G, H·Dh/G]
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # [G, Dg, H·Dh/G]
        return self.wo_b(torch.einsum("ngi,goi->ngo", grouped, w).flatten(1))

    def _attend(self, x, q, kv, q_residual, positions, cache: LayerCache) -> torch.Tensor:
        """One sequence: q [T, H, Dh], kv [T, Dh] -> [T, H, Dh]."""
        T = q.shape[0]
        past = cache.window.shape[0]
        keys = torch.cat([cache.window, kv])  # [past+T, Dh]
        key_pos = positions[0] - past + torch.arange(past + T, device=q.device)
        delta = positions.unsqueeze(-1) - key_pos  # [T, past+T]
        allowed = (delta >= 0) & (delta < self.window)
        cache.window = keys[-(self.window - 1):] if self.window > 1 else keys[:0]
        visible, most_visible = None, 0
        if self.compressor is not None:
            self.compressor.update(x, cache.compressor)
            entries = cache.compressor.entries.view()  # [C, Dh]
            if self.indexer is not None:
                visible = self.indexer.select(x, q_residual, positions, cache.indexer)
                most_visible = min(self.indexer.topk, entries.shape[0])
            else:
                visible = torch.arange(entries.shape[0], device=q.device) < ((positions + 1) // self.compressor.rate
                                                                             ).unsqueeze(-1)
                most_visible = entries.shape[0]
            keys, allowed = torch.cat([keys, entries]), torch.cat([allowed, visible], dim=-1)
        scale = self.head_dim ** -0.5
        fast = fast_paths.sink_attention(  # device kernel; None on the CPU
            q, keys, allowed, self.attn_sink, scale,
            key_lists=lambda: key_lists(positions, past, self.window, visible, most_visible))
        return fast if fast is not None else sink_attention(q, keys, allowed, self.attn_sink, scale)


def key_lists(positions: torch.Tensor, past: int, window: int, visible: torch.Tensor | None,
              most_visible: int) -> torch.Tensor:
    """The keys each query of `Attention._attend` may see, as rows of its `keys` [past+T window keys, C entries],
    built without a host sync (the sparse kernel gathers by index): int32 [T, min(window, past+T) + most_visible],
    ascending, -1 = unused slot. Exactly the True entries of `_attend`'s `allowed`.

    positions [T] of one sequence (consecutive, as the window keys' positions are); past = window keys cached before
    them; visible bool [T, C] compressed entries per query (None: no compressor), at most `most_visible` per query."""
    T = positions.shape[0]
    n_window = past + T
    width = min(window, n_window)
    # query t sees window key i iff 0 <= positions[t] - (positions[0] - past + i) < window: the `width` keys ending
    # at its own (i = positions[t] - positions[0] + past), those before key 0 unused
    first = positions - positions[0] + past - (width - 1)  # [T]
    rows = first.unsqueeze(-1) + torch.arange(width, device=positions.device)  # [T, width]
    rows = torch.where(rows >= 0, rows, -1)
    if visible is None or most_visible == 0:
        return rows.to(torch.int32)
    order = torch.argsort(visible.to(torch.int8), dim=-1, descending=True, stable=True)[:, :most_visible]
    picked = torch.where(visible.gather(1, order), order + n_window, -1)  # [T, most_visible]
    return torch.cat([rows, picked], dim=-1).to(torch.int32)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Softmax attention over shared K=V keys with one extra per-head sink logit that takes weight but gives no value.

    q [T, H, Dh], keys [S, Dh] (also the values), allowed [T, S] bool, sink [H] -> [T, H, Dh]."""
    logits = torch.einsum("thd,sd->hts", q, keys) * scale
    logits = logits.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    sinks = sink.to(logits.dtype).view(-1, 1, 1).expand(-1, q.shape[0], 1)
    combined = torch.cat([logits, sinks], dim=-1)
    probs = F.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
    return torch.einsum("hts,sd->thd", probs.to(keys.dtype), keys)
