"""Packed expert weights (kernels/packed.py): what the device kernels read must decode to exactly what the reference
path loads. Exact equality throughout (same bits, same decoding)."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import quant
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.packed import PackedExperts, PackedWeight
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
