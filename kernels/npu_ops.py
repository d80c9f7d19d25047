"""Huawei Ascend fast paths: torch_npu fused operators where they fit, written against torch_npu's documented API.

NOT VERIFIED ON HARDWARE (docs/hardware.md): no NPU was available to this work. The calls follow the op-plugin
documentation (torch_npu 7.x / CANN 8.x, Atlas A2/A3); tests/kernels/test_device.py runs them against a fake
`torch_npu` that implements each op's documented formula on the CPU, which checks our glue (layouts, group lists,
the sink identity below, chunking to the ops' limits), not the operators.

Each function returns None when the op's documented constraints do not fit (dtype, sizes, scoring function), and
the caller runs the torch reference instead. torch_npu comes from `device.load_torch_npu()`: it is already loaded,
since the tensors live on an NPU.

- `npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`; gamma must have x's dtype.
- `npu_grouped_matmul([x], [w_0..w_g], group_list=counts, split_item=2, group_type=0, group_list_type=1)`:
  x's rows split by `counts` (group_list_type 1 = per-group counts, 0 = cumulative), one output tensor, at most 128
  weights per call (we chunk). Weights are [K, N] (x @ w); we pass transposed views as MindSpeed does.
- `npu_moe_gating_top_k(x, k, bias=, k_group=, group_count=, group_select_mode=, renorm=, norm_type=, out_flag=,
  routed_scaling_factor=, eps=) -> (y, expert_idx, out)`: norm_type 1 = sigmoid, 0 = softmax; selection on
  scores + bias, weights from the unbiased scores, y = w / (sum w + eps) * routed_scaling_factor.
  DeepSeek-V4's sqrt(softplus) scoring is not among its norm types, so V4 routers always use the reference.
- `npu_fused_infer_attention_score(q, k, v, atten_mask=, num_heads=, num_key_value_heads=, scale=, input_layout=,
  sparse_mode=0, softmax_lse_flag=True) -> (out, lse)`: atten_mask True = masked; lse [B, N, Q_S, 1] float32; query
  fp16/bf16; head dim <= 512; num_heads / num_key_value_heads <= 64 (we split heads). It has no sink logit, but
  with lse = log Σ exp(logits) the sink's share is exact: out_with_sink = out * sigmoid(lse - sink).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moemesh.kernels.device import load_torch_npu

GMM_MAX_GROUPS = 128  # weights per npu_grouped_matmul call
FIA_MAX_HEAD_RATIO = 64  # num_heads / num_key_value_heads
FIA_MAX_HEAD_DIM = 512
GATING_MAX_EXPERTS, GATING_MAX_K = 2048, 32
_HALF = (torch.float16, torch.bfloat16)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """Weighted RMSNorm; the weight is cast to x's dtype, as the op requires (bf16 rounding of the weight)."""
    if x.dtype not in (*_HALF, torch.float32):
        return None
    return load_torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


def grouped_swiglu(x: Tensor, tok: Tensor, counts: list[int], w1: Tensor, w3: Tensor, w2: Tensor, limit: float,
                   row_weight: Tensor) -> Tensor | None:
    """Rows sorted by expert: x [N, D], tok [M] (token of each row), counts per expert (host ints, sum <= M),
    w1/w3 [e, I, D], w2 [e, D, I] float -> row_weight[:, None] * expert(x[tok]) [sum(counts), D] in float32."""
    if x.dtype not in (*_HALF, torch.float32):
        return None
    npu = load_torch_npu()
    out = []
    start = 0
    for g0 in range(0, len(counts), GMM_MAX_GROUPS):
        groups = range(g0, min(g0 + GMM_MAX_GROUPS, len(counts)))
        n = sum(counts[g] for g in groups)
        if n == 0:
            continue
        xs = x[tok[start:start + n]]
        group_list = torch.tensor([counts[g] for g in groups], dtype=torch.int64, device=x.device)

        def gmm(a: Tensor, w: Tensor) -> Tensor:
            return npu.npu_grouped_matmul([a], [w[g].t() for g in groups], group_list=group_list, split_item=2,
                                          group_type=0, group_list_type=1)[0]

        gate, up = gmm(xs, w1).clamp(max=limit), gmm(xs, w3).clamp(min=-limit, max=limit)
        y = gmm(F.silu(gate) * up, w2)
        out.append(y.float() * row_weight[start:start + n, None])
        start += n
    return torch.cat(out) if out else x.new_zeros(0, x.shape[1], dtype=torch.float32)


def gating_topk(logits: Tensor, bias: Tensor, k: int, scoring: str, normalize: bool, scale: float
                ) -> tuple[Tensor, Tensor] | None:
    """Learned router: logits [N, E] -> (weights [N, k] float32, expert ids [N, k] int64), as `moe.Router`."""
    norm_type = {"sigmoid": 1, "softmax": 0}.get(scoring)
    E = logits.shape[-1]
    if norm_type is None or not normalize or E > GATING_MAX_EXPERTS or not 1 <= k <= GATING_MAX_K:
        return None
    x = logits.float()
    y, idx, _ = load_torch_npu().npu_moe_gating_top_k(
        x, k, bias=bias.to(x.dtype), k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=norm_type,
        out_flag=False, routed_scaling_factor=float(scale), eps=1e-20)
    return y.float(), idx.long()


def sink_attention(q: Tensor, keys: Tensor, allowed: Tensor, sink: Tensor, scale: float) -> Tensor | None:
    """q [T, H, Dh], keys [S, Dh] (= values), allowed bool [T, S], sink [H] -> [T, H, Dh], as
    `attention.sink_attention`."""
    T, H, Dh = q.shape
    if q.dtype not in _HALF or Dh > FIA_MAX_HEAD_DIM or keys.shape[0] == 0:
        return None
    npu = load_torch_npu()
    kv = keys.to(q.dtype).reshape(1, 1, -1, Dh).contiguous()  # BNSD, one shared K=V head
    mask = (~allowed).reshape(1, 1, T, -1).contiguous()
    outs = []
    for h0 in range(0, H, FIA_MAX_HEAD_RATIO):
        qh = q[:, h0:h0 + FIA_MAX_HEAD_RATIO].transpose(0, 1).unsqueeze(0).contiguous()  # [1, h, T, Dh]
        h = qh.shape[1]
        out, lse = npu.npu_fused_infer_attention_score(
            qh, kv, kv, atten_mask=mask, num_heads=h, num_key_value_heads=1, scale=float(scale),
            input_layout="BNSD", sparse_mode=0, softmax_lse_flag=True)
        keep = torch.sigmoid(lse.float() - sink[h0:h0 + h].float().view(1, h, 1, 1))  # [1, h, T, 1]
        outs.append((out.float().nan_to_num(0.0) * keep)[0].transpose(0, 1))  # [T, h, Dh]; no key at all -> 0
    return torch.cat(outs, dim=1).to(q.dtype)
