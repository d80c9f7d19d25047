"""Mixture of experts: router (learned top-k or frozen hash table), routed SwiGLU experts, one shared expert.

Shapes: N = tokens, D = hidden, E = routed experts, k = experts per token, I = expert width.
`ExpertBank` holds any subset of one layer's experts, so the same code serves the single-process model (all
experts) and an expert shard (the experts a plan gave it): it returns, per token, the weighted sum over the token's
chosen experts that it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import fast_paths
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.packed import PackedExperts, Scratch

_SCORES = {
    "sqrtsoftplus": lambda z: F.softplus(z).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda z: torch.softmax(z, dim=-1),
}


class Router(nn.Module):
    """Tensors: `gate.weight` [E, D]; `gate.bias` [E] (learned layers: selection only, aux-loss-free balancing) or
    `gate.tid2eid` [V, k] (hash layers: token id -> its experts)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.top_k, self.scale, self.normalize = cfg.num_experts_per_tok, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.scoring, self.score = cfg.scoring_func, _SCORES[cfg.scoring_func]
        self.is_hash = cfg.mlp_layer_types[layer] == "hash_moe"
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> weights [N, k] (float32), indices [N, k] (int64 expert ids)."""
        logits = F.linear(x, self.weight)
        if not self.is_hash:  # device fused gating (kernels/fast_paths.py); None on the CPU
            fast = fast_paths.gating_topk(logits, self.bias, self.top_k, self.scoring, self.normalize, self.scale)
            if fast is not None:
                return fast
        scores = self.score(logits.float())
        if self.is_hash:
            indices = self.tid2eid[input_ids].long()
        else:
            indices = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """down(silu(min(gate, limit)) * clamp(up, ±limit)); w1 gate [I, D], w3 up [I, D], w2 down [D, I]."""
    gate = F.linear(x, w1).clamp(max=limit)
    up = F.linear(x, w3).clamp(min=-limit, max=limit)
    return F.linear(F.silu(gate) * up, w2)


class ExpertBank(nn.Module):
    """Some routed experts of one layer, stacked: w1/w3 [e, I, D], w2 [e, D, I] for `expert_ids` (global ids).

    Two forms. Float (the single-process model): w1/w2/w3 are parameters; `packed` may hold FP8/FP4 copies for the
    Triton path. Packed (expert shards, `ExpertBank(cfg, ids, packed=...)`): only `packed` is held, exactly the
    checkpoint's FP8/FP4 bytes, and w1/w2/w3 are None; the CPU path decodes one expert at a time into `scratch`
    (shared by the banks of one shard) and computes in `compute_dtype`."""

    def __init__(self, cfg: ModelConfig, expert_ids: Sequence[int] | None = None, *,
                 packed: PackedExperts | None = None, compute_dtype: torch.dtype = torch.float32,
                 scratch: Scratch | None = None):
        super().__init__()
        ids = list(range(cfg.n_routed_experts)) if expert_ids is None else sorted(set(expert_ids))
        e, D, I = len(ids), cfg.hidden_size, cfg.moe_intermediate_size
        self.expert_ids, self.limit = ids, cfg.swiglu_limit
        if packed is None:
            self.w1 = nn.Parameter(torch.zeros(e, I, D))
            self.w2 = nn.Parameter(torch.zeros(e, D, I))
            self.w3 = nn.Parameter(torch.zeros(e, I, D))
        else:
            _check_packed(packed, e, I, D)
            for name in ("w1", "w2", "w3"):
                self.register_parameter(name, None)
        slot = torch.full((cfg.n_routed_experts + 1,), -1, dtype=torch.long)  # last entry: "no expert" (-1 ids)
        slot[torch.tensor(ids, dtype=torch.long)] = torch.arange(e)
        self.register_buffer("slot_of", slot, persistent=False)
        self.packed = packed  # kernels.packed.PackedExperts on the bank's device: FP8/FP4 weights
        self.compute_dtype = compute_dtype
        self.scratch = scratch if scratch is not None else Scratch()

    @property
    def is_packed(self) -> bool:
        """Only packed weights are held (no float copy)."""
        return self.w1 is None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype experts compute in."""
        return self.compute_dtype if self.is_packed else self.w1.dtype

    @property
    def device(self) -> torch.device:
        return self.slot_of.device

    @property
    def expert_bytes(self) -> int:
        """Bytes of the expert weights held: packed (data + scales) in the packed form, else the float parameters."""
        if self.is_packed:
            return self.packed.nbytes
        return sum(w.numel() * w.element_size() for w in (self.w1, self.w2, self.w3))

    def expert_weights(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1 [I, D], w2 [D, I], w3 [I, D] of slot `s`; in the packed form decoded into scratch buffers that the next
        call overwrites."""
        if not self.is_packed:
            return self.w1[s], self.w2[s], self.w3[s]
        p, dt = self.packed, self.compute_dtype
        return self.scratch.decoded((id(self), s), lambda fresh: tuple(
            getattr(p, w).decode(s, dt, self.scratch, w, fresh) for w in ("w1", "w2", "w3")))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], indices [N, k] global ids (-1 = none), weights [N, k] -> Σ over held experts w·expert(x)  [N, D].

        Tokens are grouped by expert (one GEMM pair per expert that has tokens). On a device,
        `fast_paths.routed_experts` runs the grouped kernels instead (reading `packed` quantized weights when set)."""
        fast = fast_paths.routed_experts(self, x, indices, weights)  # None on the CPU
        if fast is not None:
            return fast
        N, k = indices.shape
        slots = self.slot_of[indices.reshape(-1)]  # [N*k], -1 where the expert is not held here
        held = (slots >= 0).nonzero().squeeze(-1)
        out = torch.zeros_like(x)
        if held.numel() == 0:
            return out
        order = held[torch.argsort(slots[held], stable=True)]
        counts = torch.bincount(slots[order], minlength=len(self.expert_ids)).tolist()
        tokens, w = order // k, weights.reshape(-1)[order]
        start = 0
        for s, n in enumerate(counts):
            if n == 0:
                continue
            tok = tokens[start:start + n]
            y = swiglu(x[tok], *self.expert_weights(s), self.limit)
            out.index_add_(0, tok, (y * w[start:start + n, None]).to(out.dtype))
            start += n
        return out


def _check_packed(packed: PackedExperts, e: int, I: int, D: int) -> None:
    for part, want in (("w1", (I, D)), ("w2", (D, I)), ("w3", (I, D))):
        w = getattr(packed, part)
        if (w.data.shape[0], w.rows, w.cols) != (e, *want):
            raise ValueError(f"packed.{part}: holds [{w.data.shape[0]}, {w.rows}, {w.cols}], expected [{e}, "
                             f"{want[0]}, {want[1]}]")


class SharedExpert(nn.Module):
    """Tensors: `shared_experts.w1/w2/w3.weight`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1)
        self.w1, self.w2 = nn.Linear(D, I, bias=False), nn.Linear(I, D, bias=False)
        self.w3 = nn.Linear(D, I, bias=False)
        self.limit = cfg.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight, self.limit)


class MoE(nn.Module):
    """One MoE block. `experts` is None when the routed experts live elsewhere (expert shards): call `route`,
    send the tokens, and add the returned sum to `shared_experts(x)`."""

    def __init__(self, cfg: ModelConfig, layer: int, with_experts: bool = True):
        super().__init__()
        self.gate = Router(cfg, layer)
        self.experts = ExpertBank(cfg) if with_experts else None
        self.shared_experts = SharedExpert(cfg)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], input_ids [N] -> [N, D]."""
        weights, indices = self.gate(x, input_ids)
        return self.experts(x, indices, weights) + self.shared_experts(x)
