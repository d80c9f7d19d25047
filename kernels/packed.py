"""Routed-expert weights kept quantized: stacks of FP8 or FP4 weights with their block scales, exactly the checkpoint's
bytes. The Triton grouped GEMM (kernels/triton_moe.py) dequantizes one tile at a time in registers; the CPU reference
path of a packed `ExpertBank` decodes one expert at a time into a reused `Scratch` buffer (`PackedWeight.decode`).

Shapes (e = experts held, R x C = one expert's float weight: w1/w3 [I, D], w2 [D, I]):
- `float`: data [e, R, C] (any float dtype), no scale.
- `fp8`: data float8_e4m3fn [e, R, C], scale [e, ceil(R/128), ceil(C/128)].
- `fp4`: data uint8 [e, R, C/2] (low nibble = even column), scale [e, R, ceil(C/32)].
Scales are ue8m0 exponent bytes (uint8, value 2**(b-127)) or float32, as in kernels/quant.py.

`decode` builds IEEE half-precision bit patterns with integer ops (no table lookups: torch's CPU gathers are tens of
times slower than an elementwise pass): an e4m3 byte `s eeee mmm` is the float16 `s 0eeee mmm0000000` times 2**8, an
e2m1 nibble `s ee m` the float16 `s 000ee m000000000` times 2**14 (subnormal codes included, both exact); the
float16 -> compute dtype conversion is a vectorized copy and the block scale (times that power of two) one multiply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from moemesh.kernels import cpu_decode, quant
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

    @property
    def nbytes(self) -> int:
        """Bytes held: data plus scales."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) if t is not None)

    def decode(self, s: int, dtype: torch.dtype, scratch: "Scratch", key: str, fresh: bool = False) -> Tensor:
        """Expert `s` as a float [rows, cols] in `dtype`, equal to `dequantize()[s]`; written into the scratch buffer
        `key` (valid until the next decode with that key), or with `fresh` into a new tensor. A "float" weight in
        `dtype` comes back as a view, no copy."""
        shape, device = (self.rows, self.cols), self.data.device
        if self.fmt == "float" and self.data.dtype == dtype:
            return self.data[s]
        out = torch.empty(shape, dtype=dtype, device=device) if fresh else scratch.get(key, shape, dtype, device)
        if self.fmt == "float":
            return out.copy_(self.data[s])
        if cpu_decode.decode(self.fmt, self.data[s], self.scale[s], out) is not None:  # one pass (numba), exact
            return out
        if self.fmt == "fp8":
            return _decode_fp8(self.data[s], self.scale[s], out, scratch)
        return _decode_fp4(self.data[s], self.scale[s], out, scratch)

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

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.w2.nbytes + self.w3.nbytes

    @property
    def experts(self) -> int:
        return self.w1.data.shape[0]

    def float_as(self, dtype: torch.dtype) -> "PackedExperts":
        """"float" weights (an unquantized checkpoint) cast to the compute dtype once; FP8/FP4 ones unchanged."""
        def cast(w: PackedWeight) -> PackedWeight:
            return PackedWeight("float", w.data.to(dtype), None, w.rows, w.cols) if w.fmt == "float" else w
        return PackedExperts(cast(self.w1), cast(self.w2), cast(self.w3))

    @classmethod
    def from_bank(cls, bank, fmt: Format, scale_fmt: quant.ScaleFormat = "ue8m0") -> "PackedExperts":
        """Quantize an ExpertBank's float weights (on the bank's device)."""
        return cls(*(PackedWeight.quantize(getattr(bank, w).detach(), fmt, scale_fmt) for w in ("w1", "w2", "w3")))

    @classmethod
    def from_stored(cls, tensors: Mapping[str, Tensor], layer: int, expert_ids: Sequence[int],
                    shapes: Mapping[str, tuple[int, int]] | None = None) -> "PackedExperts":
        """From checkpoint tensors as stored (`Checkpoint.read(names, dequantize=False)`: FP4 experts and their
        scales, never dequantized in full), for `expert_ids` of `layer` in that order. `shapes`: the float shape
        each part must have ({"w1": (I, D), ...}); a tensor that differs is named in the ValueError."""
        per_part: dict[str, list[tuple[Tensor, Tensor | None]]] = {"w1": [], "w2": [], "w3": []}
        for e in expert_ids:
            for part, name in zip(("w1", "w2", "w3"), expert_tensor_names(layer, e)):
                if name not in tensors:
                    raise ValueError(f"{name}: missing from the stored tensors")
                scale = next((tensors[s] for s in scale_names(name) if s in tensors), None)
                if shapes is not None and _float_shape(tensors[name], scale) != tuple(shapes[part]):
                    raise ValueError(f"{name}: shape {list(_float_shape(tensors[name], scale))}, expected "
                                     f"{list(shapes[part])}")
                per_part[part].append((tensors[name], scale))
        return cls(**{part: _stack_stored(items, part) for part, items in per_part.items()})


def _float_shape(weight: Tensor, scale: Tensor | None) -> tuple[int, ...]:
    """The dequantized shape of a stored weight (packed FP4 holds two columns per byte)."""
    shape = tuple(weight.shape)
    return (shape[0], 2 * shape[1]) if scale is not None and quant.is_fp4(weight) and len(shape) == 2 else shape


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


class Scratch:
    """Reused buffers for decoding one expert at a time, by key; shared by the banks of one shard, which computes one
    batch at a time (not thread-safe). Holds one expert's decoded weights plus their integer staging, and, within
    `cache_bytes`, the most recently used decoded experts (`decoded`): the micro-batches of one step reach a shard
    one after the other with the same layer, and would otherwise decode the same experts again."""

    def __init__(self, cache_bytes: int = 0):
        self._buffers: dict[str, Tensor] = {}
        self.cache_bytes, self.hits, self.misses = cache_bytes, 0, 0
        self._decoded: OrderedDict[Hashable, tuple[Tensor, ...]] = OrderedDict()
        self._decoded_bytes = 0

    def decoded(self, key: Hashable, decode: Callable[[bool], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """`decode(fresh)`'s weights for `key` (e.g. (bank, slot)), from the cache when there; a miss is decoded into
        new tensors (`fresh=True`), and kept (least recently used ones evicted) if it fits in `cache_bytes`. Without a
        budget: `decode(False)`, into the scratch buffers (valid until the next decode)."""
        if self.cache_bytes <= 0:
            return decode(False)
        hit = self._decoded.get(key)
        if hit is not None:
            self._decoded.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        weights = decode(True)
        size = sum(w.numel() * w.element_size() for w in weights)
        if size <= self.cache_bytes:
            while self._decoded_bytes + size > self.cache_bytes:
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= sum(w.numel() * w.element_size() for w in old)
            self._decoded[key] = weights
            self._decoded_bytes += size
        return weights

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values()) + self._decoded_bytes


def _pow2_scale(scale: Tensor, shift: int) -> Tensor:
    """Block scales as float32 times 2**shift: ue8m0 bytes b -> 2**(b - 127 + shift) built as float32 bits (exact for
    1 <= b + shift <= 254, checked when the weights are loaded: `check_scales`), float scales multiplied."""
    if scale.dtype == torch.uint8:
        return ((scale.to(torch.int32) + shift) << 23).view(torch.float32)
    return scale * float(2 ** shift)


def check_scales(w: PackedWeight, part: str) -> None:
    """ue8m0 scale bytes must keep `_pow2_scale`'s float32 exponent in range (no real weight comes near the edge)."""
    if not w.ue8m0 or w.scale.numel() == 0:
        return
    shift = _FP8_SHIFT if w.fmt == "fp8" else _FP4_SHIFT
    lo, hi = int(w.scale.min()), int(w.scale.max())
    if lo + shift < 1 or hi + shift > 254:
        raise ValueError(f"{part}: ue8m0 scale bytes span {lo}..{hi}; decoding needs {1 - shift}..{254 - shift}")


_FP8_SHIFT, _FP4_SHIFT = 8, 14  # float16 bit pattern -> value: times 2**8 (e4m3), 2**14 (e2m1)


def _decode_fp8(data: Tensor, scale: Tensor, out: Tensor, scratch: Scratch) -> Tensor:
    """float8_e4m3fn [R, C], scale [ceil(R/128), ceil(C/128)] -> out [R, C]. (NaN codes, never written by a quantizer,
    would decode as 480.)"""
    R, C = data.shape
    bits = scratch.get("fp8.bits", (R, C), torch.int16, data.device)
    sign = scratch.get("fp8.sign", (R, C), torch.int16, data.device)
    bits.copy_(data.view(torch.uint8))  # 0..255
    torch.bitwise_and(bits, 0x80, out=sign).bitwise_left_shift_(8)  # sign -> bit 15
    bits.bitwise_and_(0x7F).bitwise_left_shift_(7).bitwise_or_(sign)
    out.copy_(bits.view(torch.float16))
    col_scale = _pow2_scale(scale, _FP8_SHIFT).repeat_interleave(quant.FP8_BLOCK, 1)[:, :C]  # [ceil(R/128), C]
    B = quant.FP8_BLOCK
    full = R // B * B
    out[:full].view(R // B, B, C).mul_(col_scale[:R // B, None, :])
    if full < R:
        out[full:].mul_(col_scale[-1])
    return out


def _decode_fp4(data: Tensor, scale: Tensor, out: Tensor, scratch: Scratch) -> Tensor:
    """Packed e2m1 uint8 [R, C/2] (low nibble = even column), scale [R, ceil(C/32)] -> out [R, C]."""
    R, half = data.shape
    C, G = 2 * half, quant.FP4_GROUP
    word = scratch.get("fp4.word", (R, half), torch.int32, data.device)  # one byte -> two float16 in one int32
    tmp = scratch.get("fp4.tmp", (R, half), torch.int32, data.device)
    word.copy_(data)
    torch.bitwise_left_shift(word, 12, out=tmp)
    word.bitwise_or_(tmp).bitwise_and_(0x000F000F)  # low nibble at bits 0-3, high nibble at bits 16-19
    torch.bitwise_and(word, 0x00080008, out=tmp).bitwise_left_shift_(3)  # sign bit 3 -> 6 (then 15 after << 9)
    word.bitwise_and_(0x00070007).bitwise_or_(tmp).bitwise_left_shift_(9)
    out.copy_(word.view(torch.float16).view(R, C))
    s = _pow2_scale(scale, _FP4_SHIFT)  # [R, ceil(C/32)]
    full = C // G * G
    out[:, :full].view(R, C // G, G).mul_(s[:, :C // G, None])
    if full < C:
        out[:, full:].mul_(s[:, -1:])
    return out
