"""Triton RMSNorm: one program per row, float32 throughout, one cast to the input dtype at the end, exactly the
recipe of kernels/norms.py (`(weight * x * rsqrt(mean(x**2) + eps)).to(x.dtype)`, weight kept in float32).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1; see the tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * (x * inv)).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D], weight [D] -> [..., D] in x's dtype."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight: expected shape ({D},), got {tuple(weight.shape)}")
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, y, D, rows.stride(0), y.stride(0), float(eps),
                                           BLOCK=block, num_warps=warps_for(block))
    return y.view(x.shape)


def warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` elements: 4 up to 2K, 8 up to 8K, then 16 (keeps each
    thread's share of the row in registers for hidden sizes up to 7168 and beyond). A heuristic, not tuned."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16
