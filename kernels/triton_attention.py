"""Triton sparse sink attention: each query attends to a gathered list of keys (its sliding window plus the
compressed entries the lightning indexer selected), over one shared K=V head, with a per-head sink logit.

Same result as `kernels.attention.sink_attention` restricted to the listed keys: softmax over [logits of the listed
keys, sink], the sink taking weight and giving no value. Online softmax (flash style) over chunks of the list,
started from the sink (running max = sink, running sum = 1), so a chunk of unused slots can never produce NaN.
Cost is O(T · L · H · Dh) for L listed keys, however many keys the sequence holds.

Shapes: T = queries, H = heads, Dh = head dim, S = keys, L = listed keys per query (-1 = unused slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _sparse_sink_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, o_ptr, H, Dh, L, scale,
                        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh,
                        DOT_F32: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < Dh
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)  # running max starts at the sink logit
    denom = tl.full((BLOCK_H,), 1.0, dtype=tl.float32)  # exp(sink - m)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        ids = tl.load(idx_ptr + t * stride_it + offs_l, mask=offs_l < L, other=-1)
        valid = ids >= 0
        kv = tl.load(kv_ptr + ids.to(tl.int64)[:, None] * stride_kv + offs_d[None, :],
                     mask=valid[:, None] & dmask[None, :], other=0.0)  # [BLOCK_L, BLOCK_D]
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(kv.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kv))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [BLOCK_H, BLOCK_L]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, kv.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(kv.dtype), kv)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / denom[:, None]
    tl.store(o_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])


def sparse_sink_attention(q: Tensor, keys: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """q [T, H, Dh], keys [S, Dh] (also the values), idx int [T, L] (key rows, -1 = unused), sink [H] -> [T, H, Dh]
    in q's dtype. Indices must be < S: not checked here (that would cost a host sync per call)."""
    T, H, Dh = q.shape
    if keys.dim() != 2 or keys.shape[1] != Dh or idx.shape[0] != T or sink.shape != (H,):
        raise ValueError(f"shapes: q {tuple(q.shape)}, keys {tuple(keys.shape)}, idx {tuple(idx.shape)}, sink "
                         f"{tuple(sink.shape)} do not fit q [T, H, Dh], keys [S, Dh], idx [T, L], sink [H]")
    q, keys = _rows_contiguous(q), _rows_contiguous(keys)
    idx = idx.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    if T == 0:
        return out
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    block_d = max(16, triton.next_power_of_2(Dh))
    grid = (T, triton.cdiv(H, block_h))
    _sparse_sink_kernel[grid](q, keys, idx, sink.float().contiguous(), out, H, Dh, idx.shape[1], float(scale),
                              q.stride(0), q.stride(1), keys.stride(0), idx.stride(0), out.stride(0), out.stride(1),
                              DOT_F32=q.dtype == torch.float32 or q.device.type == "cpu", BLOCK_H=block_h,
                              BLOCK_L=32, BLOCK_D=block_d, num_warps=8 if block_d >= 256 else 4)
    return out


def mask_to_indices(allowed: Tensor) -> Tensor:
    """bool [T, S] -> int32 [T, L] with L = the most keys any query may see: each row's allowed key indices in
    ascending order, then -1. Costs one host sync (L); callers that know the indices should pass them directly."""
    L = max(int(allowed.sum(-1).max()), 1) if allowed.numel() else 1
    order = torch.argsort(allowed.to(torch.int8), dim=-1, descending=True, stable=True)[:, :L]
    return torch.where(allowed.gather(1, order), order, torch.full_like(order, -1)).to(torch.int32)


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
