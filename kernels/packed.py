"""Routed-expert weights kept quantized for the device kernels: stacks of FP8 or FP4 weights with their block scales,
read by the Triton grouped GEMM (kernels/triton_moe.py), which dequantizes one tile at a time in registers.

Shapes (e = experts held, R x C = one expert's float weight: w1/w3 [I, D], w2 [D, I]):
- `float`: data [e, R, C] (any float dtype), no scale.
- `fp8`: data float8_e4m3fn [e, R, C], scale [e, ceil(R/128), ceil(C/128)].
- `fp4`: data uint8 [e, R, C/2] (low nibble = even column), scale [e, R, ceil(C/32)].
Scales are ue8m0 exponent bytes (uint8, value 2**(b-127)) or float32, as in kernels/quant.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moemesh.kernels import quant
from moemesh.kernels.weights import expert_tensor_names, scale_names

Format = Literal["float", "fp8", "fp4"]


@dataclass
class PackedWeight:
    """One stacked weight (see the module docstring for the layouts)."""

    fmt: Format
    data: Tensor
    scale: Tensor | None
    rows: int
    cols: int

    @property
    def ue8m0(self) -> bool:
        return self.scale is not None and self.scale.dtype == torch.uint8

    def dequantize(self) -> Tensor:
        """float32 [e, rows, cols] (the reference the kernels are tested against)."""
        if self.fmt == "float":
            return self.data.float()
        fn = quant.dequant_fp8 if self.fmt == "fp8" else quant.dequant_fp4
        return torch.stack([fn(d, s) for d, s in zip(self.data, self.scale)])

    def to(self, device: str | torch.device) -> "PackedWeight":
        scale = None if self.scale is None else self.scale.to(device)
        return PackedWeight(self.fmt, self.data.to(device), scale, self.rows, self.cols)

    @classmethod
    def quantize(cls, w: Tensor, fmt: Format, scale_fmt: quant.ScaleFormat = "ue8m0") -> "PackedWeight":
        """Float [e, R, C] -> packed `fmt` (round-to-nearest-even, as kernels/quant.py writes checkpoints)."""
        e, rows, cols = w.shape
        if fmt == "float":
            return cls("float", w, None, rows, cols)
        fn = quant.quant_fp8 if fmt == "fp8" else quant.quant_fp4
        parts = [fn(w[i], scale_fmt=scale_fmt) for i in range(e)]
        data = torch.stack([p[0] for p in parts])
        return cls(fmt, data.view(torch.uint8) if fmt == "fp4" else data,
                   _stored_scale(torch.stack([p[1] for p in parts])), rows, cols)


@dataclass
class PackedExperts:
    """w1 (gate) / w3 (up) [e, I, D] and w2 (down) [e, D, I] of the experts an `ExpertBank` holds, in bank order."""

    w1: PackedWeight
    w2: PackedWeight
    w3: PackedWeight

    def to(self, device: str | torch.device) -> "PackedExperts":
        return PackedExperts(self.w1.to(device), self.w2.to(device), self.w3.to(device))

    @classmethod
    def from_bank(cls, bank, fmt: Format, scale_fmt: quant.ScaleFormat = "ue8m0") -> "PackedExperts":
        """Quantize an ExpertBank's float weights (on the bank's device)."""
        return cls(*(PackedWeight.quantize(getattr(bank, w).detach(), fmt, scale_fmt) for w in ("w1", "w2", "w3")))

    @classmethod
    def from_stored(cls, tensors: Mapping[str, Tensor], layer: int, expert_ids: Sequence[int]) -> "PackedExperts":
        """From checkpoint tensors as stored (`Checkpoint.read(names, dequantize=False)`: FP4 experts and their
        scales, never dequantized in full), for `expert_ids` of `layer` in that order."""
        per_part: dict[str, list[tuple[Tensor, Tensor | None]]] = {"w1": [], "w2": [], "w3": []}
        for e in expert_ids:
            for part, name in zip(("w1", "w2", "w3"), expert_tensor_names(layer, e)):
                if name not in tensors:
                    raise ValueError(f"{name}: missing from the stored tensors")
                scale = next((tensors[s] for s in scale_names(name) if s in tensors), None)
                per_part[part].append((tensors[name], scale))
        return cls(**{part: _stack_stored(items, part) for part, items in per_part.items()})


def _stack_stored(items: list[tuple[Tensor, Tensor | None]], part: str) -> PackedWeight:
    weights, scales = [w for w, _ in items], [s for _, s in items]
    first = weights[0]
    if scales[0] is None:
        return PackedWeight("float", torch.stack(weights), None, *first.shape)
    if quant.is_fp8(first):
        return PackedWeight("fp8", torch.stack(weights), _stored_scale(torch.stack(scales)), *first.shape)
    if quant.is_fp4(first):
        data = torch.stack([w.contiguous().view(torch.uint8) for w in weights])
        return PackedWeight("fp4", data, _stored_scale(torch.stack(scales)), first.shape[0], 2 * first.shape[1])
    raise ValueError(f"{part}: stored dtype {first.dtype} has a scale but is neither FP8 e4m3 nor packed FP4")


def _stored_scale(scale: Tensor) -> Tensor:
    """ue8m0 (float8_e8m0fnu or uint8) -> uint8 exponent bytes; float32/bfloat16 -> float32."""
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return scale.view(torch.uint8).contiguous()
    return scale.float().contiguous()
