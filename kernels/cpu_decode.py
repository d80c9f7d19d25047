"""One-pass CPU decode of packed expert weights (numba): each FP4 e2m1 or FP8 e4m3 code through a lookup table, times
its block scale, straight into the float32 output.

Why: an expert shard on a CPU decodes every expert it computes (kernels/packed.py keeps only the stored bytes), and
the eager-torch decode there takes about a dozen elementwise passes over int32 staging, about 2 ns per weight on a
2-core x86 machine; this single pass about 0.5 ns on one cached expert, 0.08 ms per v4-flash-mini expert (98k weights)
over a layer's experts (ad-hoc timings on that machine, not a kept benchmark). Exact: the tables hold the values
kernels/quant.py's dequantization gives, and a float32 product of a table value and a power-of-two (or float32) scale
is the same float32 either way.

`decode(fmt, data, scale, out)` returns `out`, or None when this path cannot take the call (numba missing, not a
float32 CPU output): the caller then uses the torch path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moemesh.kernels import quant

try:
    import numba
except ImportError:  # optional at import time: the torch path stays correct without it
    numba = None

FP4_TABLE = np.array(quant.FP4_VALUES, dtype=np.float32)
UE8M0_TABLE = quant.scale_to_float(torch.arange(256, dtype=torch.uint8)).numpy()  # exponent byte -> 2**(b-127)
FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()  # every e4m3 byte


def available() -> bool:
    return numba is not None


def decode(fmt: str, data: Tensor, scale: Tensor, out: Tensor) -> Tensor | None:
    """data: FP4 uint8 [R, C/2] (low nibble = even column) with scale [R, ceil(C/32)], or FP8 [R, C] with scale
    [ceil(R/128), ceil(C/128)]; ue8m0 or float scales -> `out` [R, C] float32, or None (use the torch path)."""
    if numba is None or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        return None
    codes = data.contiguous().view(torch.uint8).numpy()
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):  # exponent bytes, looked up inside the loop
        scales, scale_table = scale.contiguous().view(torch.uint8).numpy(), UE8M0_TABLE
    else:  # float scales (rare): the same lookup, through each scale's own index
        scale_table = scale.float().contiguous().numpy().reshape(-1)
        scales = np.arange(scale_table.size, dtype=np.int32).reshape(tuple(scale.shape))
    if fmt == "fp4":
        _fp4(codes, scales, scale_table, FP4_TABLE, out.numpy(), quant.FP4_GROUP)
    else:
        _fp8(codes, scales, scale_table, FP8_TABLE, out.numpy(), quant.FP8_BLOCK)
    return out


if numba is not None:
    @numba.njit(cache=True, nogil=True)
    def _fp4(codes, scales, scale_table, table, out, group):  # pragma: no cover - compiled
        rows, half = codes.shape
        per = group // 2  # bytes per scale group
        for r in range(rows):
            for g in range((half + per - 1) // per):
                s = scale_table[scales[r, g]]
                for i in range(g * per, min(half, g * per + per)):
                    b = codes[r, i]
                    out[r, 2 * i] = table[b & 15] * s
                    out[r, 2 * i + 1] = table[b >> 4] * s

    @numba.njit(cache=True, nogil=True)
    def _fp8(codes, scales, scale_table, table, out, block):  # pragma: no cover - compiled
        rows, cols = codes.shape
        for r in range(rows):
            for g in range((cols + block - 1) // block):
                s = scale_table[scales[r // block, g]]
                for c in range(g * block, min(cols, g * block + block)):
                    out[r, c] = table[codes[r, c]] * s
