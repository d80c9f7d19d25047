"""Block-scaled FP8 and FP4 weights as DeepSeek-V4 checkpoints ship them: dequantize (read) and quantize (write).

Pure torch and device-agnostic: bit patterns are decoded with small lookup tables on the tensor's own device, so the
same code runs on CPU, CUDA and NPU. Layouts (O = output rows, I = input columns):

- FP8 e4m3 (`torch.float8_e4m3fn`) weight [O, I] with one scale per 128x128 block, scale [ceil(O/128), ceil(I/128)];
  edge blocks may be partial. `w = fp8 * scale[row // 128, col // 128]`.
- FP4 e2m1, two values per byte (int8/uint8, or `torch.float4_e2m1fn_x2`) [O, I/2]: the low nibble is the even column,
  the high nibble the odd one. Nibble bits `s e e m`: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. One scale per 32
  consecutive input columns, scale [O, ceil(I/32)]. `w = fp4 * scale[row, col // 32]`.
- Scales are float32/bfloat16, or ue8m0: `torch.float8_e8m0fnu`, or its raw exponent bytes as uint8, value 2**(b-127).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

FP8_BLOCK = 128
FP4_GROUP = 32
FP8_MAX = 448.0  # largest finite e4m3fn value
FP4_MAX = 6.0  # largest e2m1 value
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
ScaleFormat = Literal["ue8m0", "float32", "bfloat16"]


def is_fp8(t: Tensor) -> bool:
    return t.dtype == torch.float8_e4m3fn


def is_fp4(t: Tensor) -> bool:
    """Packed FP4 storage (int8/uint8 bytes or float4_e2m1fn_x2). Only meaningful with a companion scale."""
    return t.dtype in (torch.int8, torch.uint8) or (_FP4_DTYPE is not None and t.dtype == _FP4_DTYPE)


def scale_to_float(scale: Tensor) -> Tensor:
    """Scales as float32: ue8m0 (float8_e8m0fnu or uint8 exponent bytes) decoded exactly as 2**(b-127)."""
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        lut = torch.tensor([2.0 ** (b - 127) for b in range(255)] + [math.nan], dtype=torch.float32,
                           device=scale.device)
        return lut[scale.view(torch.uint8).long()]
    return scale.float()


def _expand(scale: Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> Tensor:
    """[R, C] per-block scales -> [rows, cols] per-element, cutting partial edge blocks."""
    s = scale_to_float(scale)
    return s.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def _check_scale(weight_shape: tuple, scale: Tensor, block_rows: int, block_cols: int, what: str) -> None:
    rows, cols = weight_shape
    want = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale.shape) != want:
        raise ValueError(f"{what}: scale shape {tuple(scale.shape)} does not fit weight {tuple(weight_shape)} "
                         f"with {block_rows}x{block_cols} blocks (expected {want})")


def dequant_fp8(weight: Tensor, scale: Tensor, block: int = FP8_BLOCK) -> Tensor:
    """FP8 e4m3 [O, I] with block scales [ceil(O/b), ceil(I/b)] -> float32 [O, I]."""
    if weight.dim() != 2:
        raise ValueError(f"dequant_fp8: weight must be 2-D, got shape {tuple(weight.shape)}")
    _check_scale(tuple(weight.shape), scale, block, block, "dequant_fp8")
    return weight.float() * _expand(scale, *weight.shape, block, block)


def unpack_fp4(packed: Tensor) -> Tensor:
    """Packed e2m1 bytes [O, I/2] -> float32 values [O, I] (no scale applied)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    u8 = packed.contiguous().view(torch.uint8)
    low, high = lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]
    return torch.stack([low, high], dim=-1).reshape(*u8.shape[:-1], 2 * u8.shape[-1])


def dequant_fp4(packed: Tensor, scale: Tensor, group: int = FP4_GROUP) -> Tensor:
    """Packed FP4 [O, I/2] with per-`group`-column scales [O, ceil(I/group)] -> float32 [O, I]."""
    if packed.dim() != 2:
        raise ValueError(f"dequant_fp4: packed weight must be 2-D, got shape {tuple(packed.shape)}")
    values = unpack_fp4(packed)
    _check_scale(tuple(values.shape), scale, 1, group, "dequant_fp4")
    return values * _expand(scale, *values.shape, 1, group)


def dequantize(weight: Tensor, scale: Tensor) -> Tensor:
    """Dispatch on the stored dtype: FP8 e4m3 -> 128x128 blocks, packed FP4 -> groups of 32 columns."""
    if is_fp8(weight):
        return dequant_fp8(weight, scale)
    if is_fp4(weight):
        return dequant_fp4(weight, scale)
    raise ValueError(f"dequantize: {weight.dtype} is neither FP8 e4m3 nor packed FP4")


# ---- quantize (writing checkpoints) ---------------------------------------------------------------------------------
def _pick_scale(amax: Tensor, fmax: float, fmt: ScaleFormat) -> tuple[Tensor, Tensor]:
    """Per-block scale from the block's absolute max: (scale as float32, scale as stored)."""
    raw = (amax.float() / fmax).clamp(min=2.0 ** -126)
    if fmt == "ue8m0":  # round the exponent up, so no value exceeds the format's max
        exp = torch.ceil(torch.log2(raw)).clamp(-127, 127)
        stored = (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
        return scale_to_float(stored), stored
    if fmt not in ("float32", "bfloat16"):
        raise ValueError(f"scale_fmt: expected 'ue8m0', 'float32' or 'bfloat16', got {fmt!r}")
    stored = raw.to(getattr(torch, fmt))
    return stored.float(), stored


def _block_amax(w: Tensor, block_rows: int, block_cols: int) -> Tensor:
    rows, cols = w.shape
    R, C = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    padded = torch.zeros(R * block_rows, C * block_cols, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.abs()
    return padded.view(R, block_rows, C, block_cols).amax(dim=(1, 3))


def quant_fp8(w: Tensor, block: int = FP8_BLOCK, scale_fmt: ScaleFormat = "ue8m0") -> tuple[Tensor, Tensor]:
    """Float [O, I] -> (float8_e4m3fn [O, I], scales [ceil(O/b), ceil(I/b)]), round-to-nearest-even."""
    if w.dim() != 2:
        raise ValueError(f"quant_fp8: weight must be 2-D, got shape {tuple(w.shape)}")
    scale, stored = _pick_scale(_block_amax(w, block, block), FP8_MAX, scale_fmt)
    q = (w.float() / _expand(scale, *w.shape, block, block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), stored


def _fp4_codes(x: Tensor) -> Tensor:
    """Float values already in the e2m1 range -> 4-bit codes, nearest value, ties to even mantissa.

    The grid's spacing is 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6], and codes count up along it, so the code is
    `round(mag / spacing)` shifted per range; `torch.round` rounds halves to even, which is the even code (its
    mantissa bit is the code's low bit). Elementwise arithmetic only: ~4x faster than a bucketize on the CPU."""
    mag = x.float().abs().clamp(max=FP4_MAX)
    low = torch.round(mag * 2)                                  # [0, 2): codes 0..4 (2.0 is code 4)
    mid = torch.round(mag) + 2                                  # [2, 4): values 2, 3, 4 -> codes 4, 5, 6
    high = torch.round(mag / 2) + 4                             # [4, 6]: values 4, 6 -> codes 6, 7
    idx = torch.where(mag < 2, low, torch.where(mag < 4, mid, high)).to(torch.uint8)
    sign = (x < 0) & (idx > 0)  # -0.0 is stored as +0
    return idx | (sign.to(torch.uint8) << 3)


def quant_fp4(w: Tensor, group: int = FP4_GROUP, scale_fmt: ScaleFormat = "ue8m0") -> tuple[Tensor, Tensor]:
    """Float [O, I] (I even) -> (packed int8 [O, I/2], scales [O, ceil(I/group)])."""
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"quant_fp4: weight must be 2-D with an even number of columns, got {tuple(w.shape)}")
    scale, stored = _pick_scale(_block_amax(w, 1, group), FP4_MAX, scale_fmt)
    codes = _fp4_codes(w.float() / _expand(scale, *w.shape, 1, group))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), stored
