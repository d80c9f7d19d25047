"""FP8/FP4 dequantization against an independent float64 numpy reference decoded from the bit definitions."""

import math
import zlib

import numpy as np
import pytest
import torch

from moemesh.kernels import quant


# ---- the reference: bit fields decoded by hand, in float64 --------------------------------------------------------
def ref_e4m3(byte: int) -> float:
    """e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN."""
    byte = int(byte)
    s, e, m = byte >> 7, (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    mag = (m / 8) * 2.0 ** (1 - 7) if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if s else mag


def ref_e2m1(nibble: int) -> float:
    """e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (0 or 0.5)."""
    s, e, m = nibble >> 3, (nibble >> 1) & 0x3, nibble & 0x1
    mag = (m / 2) * 2.0 ** (1 - 1) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def ref_ue8m0(byte: int) -> float:
    byte = int(byte)
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


def ref_dequant_fp8(w_bytes: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    vals = np.vectorize(ref_e4m3, otypes=[np.float64])(w_bytes)
    out = np.empty_like(vals)
    for r in range(vals.shape[0]):
        for c in range(vals.shape[1]):
            out[r, c] = vals[r, c] * scale[r // block, c // block]
    return out


def ref_dequant_fp4(packed: np.ndarray, scale: np.ndarray, group: int = 32) -> np.ndarray:
    rows, half = packed.shape
    out = np.empty((rows, 2 * half), dtype=np.float64)
    for r in range(rows):
        for j in range(half):
            b = int(packed[r, j])
            out[r, 2 * j] = ref_e2m1(b & 0xF) * scale[r, (2 * j) // group]
            out[r, 2 * j + 1] = ref_e2m1(b >> 4) * scale[r, (2 * j + 1) // group]
    return out


def _random_fp8_bytes(g: torch.Generator, shape) -> torch.Tensor:
    b = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    return torch.where((b & 0x7F) == 0x7F, b & 0xF0, b)  # drop NaN patterns (every other pattern is finite)


# ---- decoding --------------------------------------------------------------------------------------------------------
def test_e4m3_table_matches_torch_and_reference():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = every.view(torch.float8_e4m3fn).float().double().numpy()
    want = np.array([ref_e4m3(b) for b in range(256)])
    np.testing.assert_array_equal(got, want)  # NaN == NaN for assert_array_equal
    assert np.nanmax(want) == quant.FP8_MAX


def test_e2m1_and_ue8m0_tables():
    assert [ref_e2m1(n) for n in range(16)] == list(quant.FP4_VALUES)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    np.testing.assert_array_equal(quant.scale_to_float(every).double().numpy(), [ref_ue8m0(b) for b in range(256)])
    np.testing.assert_array_equal(quant.scale_to_float(every.view(torch.float8_e8m0fnu)).double().numpy(),
                                  [ref_ue8m0(b) for b in range(256)])


@pytest.mark.parametrize("shape", [(128, 256), (200, 130), (5, 300)])  # whole, partial-edge and tiny blocks
@pytest.mark.parametrize("scale_kind", ["ue8m0_bytes", "e8m0", "float32", "bfloat16"])
def test_dequant_fp8_exact(shape, scale_kind):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, scale_kind)).encode()))
    w = _random_fp8_bytes(g, shape)
    R, C = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    if scale_kind in ("ue8m0_bytes", "e8m0"):
        sbytes = torch.randint(110, 140, (R, C), generator=g, dtype=torch.int32).to(torch.uint8)
        scale = sbytes if scale_kind == "ue8m0_bytes" else sbytes.view(torch.float8_e8m0fnu)
        s64 = np.vectorize(ref_ue8m0, otypes=[np.float64])(sbytes.numpy())
    else:
        scale = (torch.rand(R, C, generator=g) * 3 + 1e-3).to(getattr(torch, scale_kind))
        s64 = scale.double().numpy()
    got = quant.dequant_fp8(w.view(torch.float8_e4m3fn), scale)
    want = ref_dequant_fp8(w.numpy(), s64)
    assert got.dtype == torch.float32 and got.shape == shape
    # power-of-two scales: the product is exact; float scales: one float32 rounding of the exact float64 product
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


@pytest.mark.parametrize("shape", [(4, 64), (3, 80), (7, 2)])  # whole groups, a partial last group, one partial
@pytest.mark.parametrize("storage", ["int8", "uint8", "float4"])
def test_dequant_fp4_exact(shape, storage):
    g = torch.Generator().manual_seed(7)
    packed = torch.randint(0, 256, (shape[0], shape[1] // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    sbytes = torch.randint(100, 150, (shape[0], math.ceil(shape[1] / 32)), generator=g, dtype=torch.int32)
    sbytes = sbytes.to(torch.uint8)
    stored = {"int8": packed.view(torch.int8), "uint8": packed, "float4": packed.view(torch.float4_e2m1fn_x2)}
    got = quant.dequant_fp4(stored[storage], sbytes.view(torch.float8_e8m0fnu))
    want = ref_dequant_fp4(packed.numpy(), np.vectorize(ref_ue8m0, otypes=[np.float64])(sbytes.numpy()))
    assert got.shape == shape
    np.testing.assert_array_equal(got.double().numpy(), want)


def test_dequantize_dispatch_and_errors():
    w8, s8 = quant.quant_fp8(torch.randn(10, 20))
    torch.testing.assert_close(quant.dequantize(w8, s8), quant.dequant_fp8(w8, s8))
    w4, s4 = quant.quant_fp4(torch.randn(10, 20))
    torch.testing.assert_close(quant.dequantize(w4, s4), quant.dequant_fp4(w4, s4))
    with pytest.raises(ValueError, match="scale shape"):
        quant.dequant_fp8(w8, torch.ones(2, 2))
    with pytest.raises(ValueError, match="neither"):
        quant.dequantize(torch.ones(2, 2), torch.ones(1, 1))


# ---- round trips -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["ue8m0", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(256, 128), (130, 260)])
def test_fp8_round_trip_within_bound(fmt, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    w[:3, :3] = 0.0  # a zero corner must survive
    q, s = quant.quant_fp8(w, scale_fmt=fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    back = quant.dequant_fp8(q, s)
    scale = quant._expand(s, *shape, 128, 128)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative for normals; subnormal spacing 2^-9 -> 2^-10 * scale
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert torch.all((back - w).abs() <= bound * (1 + 1e-6))
    assert torch.all(back[:3, :3] == 0)
    assert torch.all(w.abs() / scale <= quant.FP8_MAX * (1 + 2 ** -7))


@pytest.mark.parametrize("fmt", ["ue8m0", "float32"])
def test_fp4_round_trip_within_bound(fmt):
    w = torch.randn(17, 96, generator=torch.Generator().manual_seed(2)) * 0.03
    q, s = quant.quant_fp4(w, scale_fmt=fmt)
    assert q.dtype == torch.int8 and q.shape == (17, 48) and s.shape == (17, 3)
    back = quant.dequant_fp4(q, s)
    scale = quant._expand(s, 17, 96, 1, 32)
    # e2m1: 1 mantissa bit -> half an ulp is 2^-2 relative for normals; subnormal spacing 0.5 -> 0.25 * scale
    bound = torch.maximum(w.abs() * 0.25, scale * 0.25)
    assert torch.all((back - w).abs() <= bound * (1 + 1e-6))


def test_fp4_rounding_is_nearest_ties_to_even():
    grid = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.3, -5.5])
    want = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -6.0])
    codes = quant._fp4_codes(grid)
    assert torch.equal(torch.tensor([quant.FP4_VALUES[c] for c in codes.tolist()]), want)


def test_fp4_packing_order():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 1.0, -6.0  # even column -> low nibble, odd column -> high nibble
    q, s = quant.quant_fp4(w, scale_fmt="float32")
    assert s.item() == 1.0
    assert q.view(torch.uint8)[0, 0].item() == (0b1111 << 4) | 0b0010


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequant_on_cuda_equals_cpu():
    w = torch.randn(200, 130, generator=torch.Generator().manual_seed(3))
    for q in (quant.quant_fp8, quant.quant_fp4):
        packed, scale = q(w)
        on_gpu = quant.dequantize(packed.cuda(), scale.cuda())
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), quant.dequantize(packed, scale))
