"""Packed expert weights (kernels/packed.py): what the device kernels read must decode to exactly what the reference
path loads. Exact equality throughout (same bits, same decoding)."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import quant
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.packed import PackedExperts, PackedWeight, Scratch, check_scales
from moemesh.kernels.weights import expert_tensor_names


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
def test_quantize_matches_the_checkpoint_writer(fmt, scale_fmt):
    w = torch.randn(3, 130, 260)
    packed = PackedWeight.quantize(w, fmt, scale_fmt)
    fn = quant.quant_fp8 if fmt == "fp8" else quant.quant_fp4
    for e in range(3):
        data, scale = fn(w[e], scale_fmt=scale_fmt)
        dequant = quant.dequant_fp8 if fmt == "fp8" else quant.dequant_fp4
        assert torch.equal(packed.dequantize()[e], dequant(data, scale))
    assert packed.ue8m0 == (scale_fmt == "ue8m0") and (packed.rows, packed.cols) == (130, 260)
    assert packed.data.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.uint8)


def test_stored_fp4_experts_decode_to_what_the_loader_reads(tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    ids = [5, 0, 3]
    names = [n for e in ids for n in expert_tensor_names(1, e)]
    packed = PackedExperts.from_stored(ckpt.read(names, dequantize=False), 1, ids)
    floats = ckpt.read(names)
    assert (packed.w1.fmt, packed.w2.fmt, packed.w3.fmt) == ("fp4", "fp4", "fp4")
    for part in ("w1", "w2", "w3"):
        expected = torch.stack([floats[f"layers.1.ffn.experts.{e}.{part}.weight"] for e in ids])
        assert torch.equal(getattr(packed, part).dequantize(), expected)


def test_missing_stored_tensor_is_named():
    with pytest.raises(ValueError, match=r"layers\.2\.ffn\.experts\.4\.w1\.weight: missing"):
        PackedExperts.from_stored({}, 2, [4])


# ---- decode: one expert at a time, as a packed ExpertBank computes on the CPU ------------------------------------
@pytest.mark.parametrize("fmt, shape", [("fp8", (2, 256, 384)), ("fp8", (2, 130, 260)), ("fp4", (2, 64, 128)),
                                        ("fp4", (2, 33, 70))])  # whole blocks, and partial edge blocks/groups
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
@pytest.mark.parametrize("path", ["one-pass", "torch"])
def test_decode_is_exactly_the_reference_dequantization(fmt, shape, scale_fmt, path, monkeypatch):
    """Both CPU decoders (kernels/cpu_decode.py's one pass with numba, and the torch passes it falls back to)."""
    from moemesh.kernels import cpu_decode

    if path == "torch":
        monkeypatch.setattr(cpu_decode, "numba", None)
    else:
        assert cpu_decode.available()  # numba is a dependency: the fast path must be what runs here
    w = torch.randn(*shape) * torch.logspace(-3, 1, shape[-1])  # a wide range of magnitudes: subnormal codes too
    packed = PackedWeight.quantize(w, fmt, scale_fmt)
    ref, scratch = packed.dequantize(), Scratch()
    for s in range(shape[0]):
        assert torch.equal(packed.decode(s, torch.float32, scratch, "w"), ref[s])
    if scale_fmt == "ue8m0":  # power-of-two scales: bfloat16 holds every decoded value exactly
        assert torch.equal(packed.decode(1, torch.bfloat16, scratch, "w"), ref[1].bfloat16())


def test_decode_reuses_its_scratch_buffers():
    packed, scratch = PackedWeight.quantize(torch.randn(3, 64, 128), "fp4"), Scratch()
    first = packed.decode(0, torch.float32, scratch, "w1")
    size = scratch.nbytes
    second = packed.decode(2, torch.float32, scratch, "w1")
    assert second.data_ptr() == first.data_ptr() and scratch.nbytes == size
    assert torch.equal(second, packed.dequantize()[2])


def test_nbytes_counts_data_and_scales():
    packed = PackedWeight.quantize(torch.randn(2, 64, 128), "fp4")
    assert packed.nbytes == 2 * 64 * 64 + 2 * 64 * 4  # two codes per byte, one scale byte per 32 columns


def test_scale_bytes_outside_the_decodable_range_are_refused():
    packed = PackedWeight.quantize(torch.randn(1, 8, 64), "fp4")
    packed.scale[0, 0, 0] = 250
    with pytest.raises(ValueError, match=r"w1: ue8m0 scale bytes span .*250"):
        check_scales(packed, "w1")
