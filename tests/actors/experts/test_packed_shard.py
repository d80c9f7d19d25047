"""Expert shards keep their experts packed: the bytes held are the checkpoint's own FP4 bytes, loading never
dequantizes a whole weight, and computing from the packed form matches a float64 reference.

Tolerance: the packed bank decodes each expert exactly (tests/kernels/test_packed.py), so its only error against the
float64 reference (same decoded weights, same tokens) is float32 rounding in the three GEMMs and the SwiGLU:
max |packed - ref| / max |ref| <= 1e-5 (about 100 float32 eps)."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from moemesh.actors.experts.shard import ExpertShard
from moemesh.kernels import quant
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.tiny import write_tiny_model
from moemesh.kernels.weights import expert_tensor_names

TOLERANCE = 1e-5
LAYER, HELD = 2, [0, 3, 5, 6, 11, 15]


def _packed_shard(model_dir, assignment=None, **kw) -> ExpertShard:
    ckpt = Checkpoint(model_dir)
    return ExpertShard.from_loader(ckpt.config, assignment or {LAYER: HELD},
                                   partial(ckpt.read_experts, dequantize=False), **kw)


def _reference(ckpt: Checkpoint, x, ids, weights) -> torch.Tensor:
    """float64: Σ over the token's held experts of weight · SwiGLU(x), from the dequantized checkpoint weights."""
    limit = ckpt.config.swiglu_limit
    floats = {k: v.double() for k, v in ckpt.read_experts(LAYER, HELD).items()}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for e, w in zip(ids[n].tolist(), weights[n].tolist()):
            if e not in HELD:
                continue
            w1, w2, w3 = (floats[name] for name in expert_tensor_names(LAYER, e))
            gate = (w1 @ x[n].double()).clamp(max=limit)
            up = (w3 @ x[n].double()).clamp(-limit, limit)
            out[n] += w * (w2 @ (F.silu(gate) * up))
    return out


def test_shard_holds_the_checkpoints_fp4_bytes(tiny_model_dir):
    shard = _packed_shard(tiny_model_dir)
    bank = shard.banks[LAYER]
    stored = Checkpoint(tiny_model_dir).read_experts(LAYER, HELD, dequantize=False)
    assert bank.is_packed and bank.w1 is None and bank.packed.w1.fmt == "fp4"
    for slot, e in enumerate(HELD):
        w1 = expert_tensor_names(LAYER, e)[0]
        assert torch.equal(bank.packed.w1.data[slot], stored[w1].view(torch.uint8))
        assert torch.equal(bank.packed.w1.scale[slot], stored[w1.removesuffix(".weight") + ".scale"].view(torch.uint8))
    assert shard.expert_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert shard.memory()["expert_bytes"] == shard.expert_bytes and shard.memory()["rss_bytes"] > 0


def test_loading_never_dequantizes_a_weight(tiny_model_dir, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a whole weight was dequantized while loading")

    for fn in ("dequantize", "dequant_fp4", "dequant_fp8", "unpack_fp4"):
        monkeypatch.setattr(quant, fn, refuse)
    shard = _packed_shard(tiny_model_dir, {layer: list(range(16)) for layer in range(4)})
    assert sorted(shard.banks) == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [1, 7, 64])
def test_packed_bank_matches_the_float64_reference(tiny_model_dir, n):
    shard = _packed_shard(tiny_model_dir)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, shard.cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(n)])
    ids[0, -1] = -1  # an empty slot
    weights = torch.rand(n, 4, generator=g)
    with torch.no_grad():
        got = shard.banks[LAYER](x, ids, weights)
    ref = _reference(Checkpoint(tiny_model_dir), x, ids, weights)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) <= TOLERANCE


def test_unquantized_checkpoint_loads_as_float(tmp_path, tiny_model_dir):
    float_dir = write_tiny_model(tmp_path / "tiny-f32", dtype="float32")
    shard, quantized = _packed_shard(float_dir), _packed_shard(tiny_model_dir)
    bank = shard.banks[LAYER]
    assert bank.packed.w1.fmt == "float" and bank.packed.w1.data.dtype == torch.float32
    assert shard.expert_bytes == 4 * len(HELD) * 3 * shard.cfg.hidden_size * shard.cfg.moe_intermediate_size
    assert shard.expert_bytes > 6 * quantized.expert_bytes  # FP4 + scales: about 1/7.5 of float32
    x, ids, w = torch.randn(5, shard.cfg.hidden_size), torch.randint(0, 16, (5, 2)), torch.rand(5, 2)
    with torch.no_grad():
        got = bank(x, ids, w)
    ref = _reference(Checkpoint(float_dir), x, ids, w)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) <= TOLERANCE


def test_bfloat16_shard_decodes_into_bfloat16(tiny_model_dir):
    shard = _packed_shard(tiny_model_dir, dtype=torch.bfloat16)
    bank = shard.banks[LAYER]
    w1, _, _ = bank.expert_weights(0)
    assert bank.dtype == w1.dtype == torch.bfloat16 and bank.packed.w1.fmt == "fp4"
    assert torch.equal(w1, bank.packed.w1.dequantize()[0].bfloat16())


def test_a_shard_without_experts_reports_its_empty_footprint(tiny_model_dir):
    """A shard holding nothing reports no expert or scratch bytes (`empty_rss_bytes` in the bench is the shard
    process's RSS before it loaded experts: cluster/serve/hosts.py)."""
    memory = ExpertShard.from_loader(Checkpoint(tiny_model_dir).config, {}, None).memory()
    assert memory["expert_bytes"] == 0 and memory["scratch_bytes"] == 0
    assert 0 < memory["rss_bytes"] <= memory["peak_rss_bytes"]


def test_decoded_experts_are_reused_within_the_budget_and_give_the_same_answer(tiny_model_dir):
    """The micro-batches of a step bring a layer to the shard one after the other: the second finds the experts the
    first decoded (`BatchingConfig.decoded_cache`, a fraction of the packed bytes), and the answer is the same."""
    from moemesh.actors.experts.shard import BatchingConfig
    from moemesh.proto.codec import TokenBatch

    cfg = Checkpoint(tiny_model_dir).config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.n_routed_experts, (6, 2), generator=g)
    batch = TokenBatch(LAYER, x, ids, torch.rand(6, 2, generator=g))
    plain = _packed_shard(tiny_model_dir, batching=BatchingConfig(decoded_cache=0))
    want = asyncio.run(plain.dispatch(batch))
    shard = _packed_shard(tiny_model_dir, batching=BatchingConfig(decoded_cache=8))  # room for every expert
    scratch = shard.banks[LAYER].scratch
    first, second = asyncio.run(shard.dispatch(batch)), asyncio.run(shard.dispatch(batch))
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    distinct = len(set(ids.unique().tolist()) & set(HELD))
    assert scratch.misses == distinct and scratch.hits == distinct  # decoded once, then reused
    float_bytes = 4 * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert scratch.nbytes >= distinct * float_bytes and plain.banks[LAYER].scratch.hits == 0
    small = _packed_shard(tiny_model_dir, batching=BatchingConfig(decoded_cache=1e-9))  # below one expert: none kept
    asyncio.run(small.dispatch(batch))
    assert small.banks[LAYER].scratch.hits == 0 and small.banks[LAYER].scratch._decoded_bytes == 0
