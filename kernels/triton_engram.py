"""Triton kernels for Engram on the attention worker: the table row gather, and the fused gate of the v4.1 form.

Gather: rows[n] = concat_j table[offsets[j] + ids[n, j]] (kernels.engram.EngramMemory.lookup without its bounds
check, which stays with the caller). Gate: for every token t and stream s,
  alpha = sigmoid(sign(x) sqrt(max(|x|, 1e-6))), x = <rmsnorm(h[t,s]) * qw, rmsnorm(k[t,s]) * kw> / sqrt(D),
  out[t,s] = h[t,s] + alpha * v[t]
(kernels.engram.EngramGate, form "v4.1"), one program per (t, s): both norms, the dot and the update in one pass.
float32 math, one cast to the streams' dtype at the end.

Shapes: N/T = tokens, J = hash heads (orders x heads), hd = head dim, S = residual streams, D = hidden.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from moemesh.kernels.triton_norm import warps_for

GATE_FLOOR = 1e-6  # |x| floor under the sqrt, as kernels.engram


@triton.jit
def _gather_kernel(ids_ptr, off_ptr, table_ptr, out_ptr, J, hd, stride_ids, stride_table, stride_out,
                   BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    row = tl.load(ids_ptr + n * stride_ids + j).to(tl.int64) + tl.load(off_ptr + j).to(tl.int64)
    for d0 in range(0, hd, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < hd
        vals = tl.load(table_ptr + row * stride_table + offs, mask=mask)
        tl.store(out_ptr + n * stride_out + j * hd + offs, vals, mask=mask)


@triton.jit
def _gate_kernel(h_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, out_ptr, S, D, eps, inv_sqrt_d, floor,
                 stride_ht, stride_hs, stride_kt, stride_ks, stride_vt, stride_ot, stride_os, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + t * stride_ht + s * stride_hs + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + t * stride_kt + s * stride_ks + offs, mask=mask, other=0.0).to(tl.float32)
    qw = tl.load(qw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kw = tl.load(kw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hn = h / tl.sqrt(tl.sum(h * h, axis=0) / D + eps) * qw
    kn = k / tl.sqrt(tl.sum(k * k, axis=0) / D + eps) * kw
    x = tl.sum(hn * kn, axis=0) * inv_sqrt_d
    sgn = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    alpha = tl.sigmoid(sgn * tl.sqrt(tl.maximum(tl.abs(x), floor)))
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + s * stride_os + offs, (h + alpha * v).to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(hash_ids: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    """hash_ids int [N, J] (each within its head's table; not checked here), offsets int [J] (first row of each
    head's table), table [R, hd] -> rows [N, J*hd] in the table's dtype."""
    N, J = hash_ids.shape
    hd = table.shape[1]
    if offsets.shape != (J,):
        raise ValueError(f"offsets: expected shape ({J},), got {tuple(offsets.shape)}")
    ids = hash_ids.contiguous()
    table = table if table.stride(-1) == 1 else table.contiguous()
    out = torch.empty(N, J * hd, dtype=table.dtype, device=table.device)
    if N:
        _gather_kernel[(N, J)](ids, offsets.contiguous(), table, out, J, hd, ids.stride(0), table.stride(0),
                               out.stride(0), BLOCK_D=min(1024, max(16, triton.next_power_of_2(hd))))
    return out


def engram_gate(streams: Tensor, keys: Tensor, value: Tensor, query_norm: Tensor, key_norm: Tensor,
                eps: float) -> Tensor:
    """streams [T, S, D], keys [T, S, D] (key_proj output), value [T, D] (value_proj output), norm weights [D]
    -> streams + alpha * value, [T, S, D] in the streams' dtype."""
    T, S, D = streams.shape
    if keys.shape != streams.shape or value.shape != (T, D) or query_norm.shape != (D,) or key_norm.shape != (D,):
        raise ValueError(f"shapes: streams {tuple(streams.shape)}, keys {tuple(keys.shape)}, value "
                         f"{tuple(value.shape)}, norms {tuple(query_norm.shape)}/{tuple(key_norm.shape)} do not fit "
                         "[T, S, D], [T, S, D], [T, D], [D]")
    h, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (streams, keys, value))
    out = torch.empty(T, S, D, dtype=streams.dtype, device=streams.device)
    if T:
        block = triton.next_power_of_2(D)
        _gate_kernel[(T, S)](h, k, v, query_norm.contiguous(), key_norm.contiguous(), out, S, D, float(eps),
                             1.0 / math.sqrt(D), GATE_FLOOR, h.stride(0), h.stride(1), k.stride(0), k.stride(1),
                             v.stride(0), out.stride(0), out.stride(1), BLOCK=block, num_warps=2 * warps_for(block))
    return out
