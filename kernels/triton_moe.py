"""Triton kernels for routed experts: a grouped SwiGLU GEMM over (token, expert) pairs sorted by expert, and a grouped
GEMM (the down projection; with one group, a dense linear). Weights are float, FP8 e4m3 with 128x128 block scales, or
packed FP4 e2m1 with per-32 scales (kernels/packed.py); quantized weights are dequantized one tile at a time in
registers and never materialised in full. Accumulation is float32.

They launch on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 before this module
is imported), which is how tests/kernels/test_triton_kernels.py checks them against float64 references.

Shapes: M = (token, expert) pairs (rows), sorted by expert; e = experts held; D = hidden; I = expert width.
A block table splits the rows into tiles of BLOCK_M rows that never straddle two experts: tile b covers rows
[lo[b], hi[b]) of expert ex[b] (ex = -1: an unused tile, skipped).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moemesh.kernels.packed import PackedWeight

_FMT = {"float": 0, "fp8": 1, "fp4": 2}
FP8_BLOCK, FP4_GROUP = 128, 32


# ---- device helpers -------------------------------------------------------------------------------------------------
@triton.jit
def _scale(ptrs, mask, UE8M0: tl.constexpr):
    if UE8M0:  # exponent byte b -> 2**(b-127), built bit-exactly as the float32 with that exponent field
        b = tl.load(ptrs, mask=mask, other=127).to(tl.int32)
        return (b << 23).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=1.0).to(tl.float32)


@triton.jit
def _e2m1(code):
    """4-bit codes `s e e m` -> float32 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with sign."""
    mag = code & 7
    ex = mag >> 1
    m = mag & 1
    twice = tl.where(ex == 0, m, (2 + m) << tl.maximum(ex - 1, 0))  # 2 * |value|, integer
    val = twice.to(tl.float32) * 0.5
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _weight_tile(w_ptr, s_ptr, ex, offs_n, offs_k, N, K, stride_we, stride_wn, stride_se, stride_sn,
                 FMT: tl.constexpr, UE8M0: tl.constexpr):
    """W[ex][offs_n, offs_k] transposed -> float32 [BLOCK_K, BLOCK_N]; W[ex] is [N, K] logically."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    row = w_ptr + ex * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    if FMT == 0:
        w = tl.load(row + offs_k[:, None], mask=mask, other=0.0).to(tl.float32)
    elif FMT == 1:
        w = tl.load(row + offs_k[:, None], mask=mask, other=0.0).to(tl.float32)
        s_at = s_ptr + ex * stride_se + (offs_n[None, :] // 128) * stride_sn + offs_k[:, None] // 128
        w = w * _scale(s_at, mask, UE8M0)
    else:
        byte = tl.load(row + offs_k[:, None] // 2, mask=mask, other=0).to(tl.int32)
        w = _e2m1((byte >> ((offs_k[:, None] % 2) * 4)) & 15)
        s_at = s_ptr + ex * stride_se + offs_n[None, :].to(tl.int64) * stride_sn + offs_k[:, None] // 32
        w = w * _scale(s_at, mask, UE8M0)
    return w


@triton.jit
def _mma(acc, a, w, DOT_F32: tl.constexpr):
    """acc += a @ w: in float32 (ieee) when DOT_F32, else in a's dtype (bf16/fp16 tensor cores), fp32 accumulate."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    else:
        return tl.dot(a, w.to(a.dtype), acc)


# ---- kernels --------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_up_kernel(x_ptr, tok_ptr, ex_ptr, lo_ptr, hi_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr,
                      D, I, stride_x, stride_we, stride_wn, stride_se, stride_sn, stride_h, limit,
                      FMT: tl.constexpr, UE8M0: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[r] = silu(min(x[tok[r]] @ w1^T, limit)) * clamp(x[tok[r]] @ w3^T, ±limit) for the rows of one tile."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ex = tl.load(ex_ptr + pid_m).to(tl.int64)
    if ex < 0:
        return
    rows = tl.load(lo_ptr + pid_m) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(hi_ptr + pid_m)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :], mask=rmask[:, None] & (offs_k[None, :] < D),
                    other=0.0)
        gate = _mma(gate, a, _weight_tile(w1_ptr, s1_ptr, ex, offs_n, offs_k, I, D, stride_we, stride_wn, stride_se,
                                          stride_sn, FMT, UE8M0), DOT_F32)
        up = _mma(up, a, _weight_tile(w3_ptr, s3_ptr, ex, offs_n, offs_k, I, D, stride_we, stride_wn, stride_se,
                                      stride_sn, FMT, UE8M0), DOT_F32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    h = gate * tl.sigmoid(gate) * up
    out = h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_n[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_n[None, :] < I))


@triton.jit
def _grouped_mm_kernel(a_ptr, rw_ptr, ex_ptr, lo_ptr, hi_ptr, w_ptr, s_ptr, y_ptr,
                       K, N, stride_a, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                       HAS_RW: tl.constexpr, FMT: tl.constexpr, UE8M0: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r] = rw[r] * (a[r] @ W[ex]^T) for the rows of one tile (rw = 1 without HAS_RW)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ex = tl.load(ex_ptr + pid_m).to(tl.int64)
    if ex < 0:
        return
    rows = tl.load(lo_ptr + pid_m) + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(hi_ptr + pid_m)
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + offs_k[None, :], mask=rmask[:, None] & (offs_k[None, :] < K),
                    other=0.0)
        acc = _mma(acc, a, _weight_tile(w_ptr, s_ptr, ex, offs_n, offs_k, N, K, stride_we, stride_wn, stride_se,
                                        stride_sn, FMT, UE8M0), DOT_F32)
    if HAS_RW:
        acc = acc * tl.load(rw_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + rows64[:, None] * stride_y + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & (offs_n[None, :] < N))


# ---- launchers ------------------------------------------------------------------------------------------------------
def block_table(counts: Tensor, block_m: int, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows per expert (int64 [e], rows sorted by expert) -> tiles (ex, lo, hi), int32 [cdiv(n_rows, block_m) + e].

    Built on the counts' device without a host sync: the tile count is an upper bound; unused tiles get ex = -1."""
    e = counts.numel()
    n_tiles = triton.cdiv(max(n_rows, 1), block_m) + e
    tiles = (counts + block_m - 1) // block_m  # [e]
    tiles_end = torch.cumsum(tiles, 0)
    row_start = torch.cumsum(counts, 0) - counts
    b = torch.arange(n_tiles, device=counts.device)
    owner = torch.searchsorted(tiles_end, b, right=True)  # expert of tile b; e when b is past the last tile
    valid = owner < e
    own = owner.clamp(max=e - 1)
    lo = row_start[own] + (b - (tiles_end[own] - tiles[own])) * block_m
    hi = row_start[own] + counts[own]
    ex = torch.where(valid, own, torch.full_like(own, -1))
    return ex.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)


def _blocks(n_rows: int, n_experts: int, dim: int) -> tuple[int, int, int]:
    """Tile sizes: BLOCK_M 16 for decode-sized groups, 64 otherwise. Not autotuned (see docs/hardware.md)."""
    block_m = 16 if n_rows <= 16 * max(n_experts, 1) else 64
    return block_m, 64, 64


def _weight_args(w: PackedWeight) -> tuple:
    scale = w.scale if w.scale is not None else w.data  # unused pointer when float
    s_e = scale.stride(0) if w.scale is not None else 0
    s_n = scale.stride(1) if w.scale is not None else 0
    return w.data, scale, w.data.stride(0), w.data.stride(1), s_e, s_n, _FMT[w.fmt], w.ue8m0


def _check(w: PackedWeight, rows: int, cols: int, what: str) -> None:
    if (w.rows, w.cols) != (rows, cols) or w.data.stride(-1) != 1:
        raise ValueError(f"{what}: expected a row-major [e, {rows}, {cols}] weight, got {w.fmt} "
                         f"[e, {w.rows}, {w.cols}] with strides {tuple(w.data.stride())}")


def swiglu_up(x: Tensor, tok: Tensor, counts: Tensor, w1: PackedWeight, w3: PackedWeight, limit: float,
              blocks: tuple[int, int, int] | None = None) -> Tensor:
    """x [N, D], tok int32 [M] (token of each row, rows sorted by expert), counts int64 [e] -> h [M, I] in x's dtype.
    Rows past sum(counts) are left uninitialised (they belong to no expert held here)."""
    M, (N, D), I = tok.numel(), x.shape, w1.rows
    _check(w1, I, D, "w1")
    _check(w3, I, D, "w3")
    if w1.fmt != w3.fmt or w1.data.stride() != w3.data.stride() or (w1.scale is None) != (w3.scale is None):
        raise ValueError("w1/w3: must share format and layout")
    bm, bn, bk = blocks or _blocks(M, counts.numel(), D)
    ex, lo, hi = block_table(counts, bm, M)
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    w1d, s1, swe, swn, sse, ssn, fmt, ue8m0 = _weight_args(w1)
    w3d, s3 = _weight_args(w3)[:2]
    grid = (ex.numel(), triton.cdiv(I, bn))
    _swiglu_up_kernel[grid](x, tok, ex, lo, hi, w1d, s1, w3d, s3, h, D, I, x.stride(0), swe, swn, sse, ssn,
                            h.stride(0), float(limit), FMT=fmt, UE8M0=ue8m0, DOT_F32=_dot_f32(x),
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return h


def grouped_mm(a: Tensor, counts: Tensor, w: PackedWeight, row_weight: Tensor | None = None,
               out_dtype: torch.dtype = torch.float32, blocks: tuple[int, int, int] | None = None) -> Tensor:
    """a [M, K] (rows sorted by expert), counts int64 [e], W [e, N, K] -> y [M, N] = row_weight[:, None] * a @ W^T,
    in `out_dtype`. Rows past sum(counts) come back as zeros."""
    M, K = a.shape
    _check(w, w.rows, K, "w")
    bm, bn, bk = blocks or _blocks(M, counts.numel(), K)
    ex, lo, hi = block_table(counts, bm, M)
    y = torch.zeros(M, w.rows, dtype=out_dtype, device=a.device)
    wd, s, swe, swn, sse, ssn, fmt, ue8m0 = _weight_args(w)
    rw = row_weight if row_weight is not None else a
    grid = (ex.numel(), triton.cdiv(w.rows, bn))
    _grouped_mm_kernel[grid](a, rw, ex, lo, hi, wd, s, y, K, w.rows, a.stride(0), swe, swn, sse, ssn, y.stride(0),
                             HAS_RW=row_weight is not None, FMT=fmt, UE8M0=ue8m0, DOT_F32=_dot_f32(a),
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


def quantized_linear(x: Tensor, w: PackedWeight) -> Tensor:
    """x [N, K] @ W^T for one packed weight (w.data [1, N, K] or [1, N, K/2]) -> [N, N_out] in x's dtype."""
    counts = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    return grouped_mm(x.contiguous(), counts, w, out_dtype=x.dtype)


def _dot_f32(t: Tensor) -> bool:
    # float32 inputs keep ieee float32 products; under the CPU interpreter, bf16/fp16 dots are not supported
    return t.dtype == torch.float32 or t.device.type == "cpu"
