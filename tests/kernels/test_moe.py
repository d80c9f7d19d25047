"""Router and experts against float64 evaluations of the formulas (ARCHITECTURE.md section 2), and the bank split that
expert shards rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemesh.kernels.config import ModelConfig
from moemesh.kernels.moe import MoE, ExpertBank, Router
from moemesh.kernels.sampling import SamplingParams, sample

E, K, D, I, V = 12, 3, 16, 8, 50


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _cfg(**over) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], layer_types=["sliding_attention"] * 2,
                head_dim=16, num_attention_heads=2, o_groups=1, swiglu_limit=1.5)
    base.update(over)
    return ModelConfig(**base)


def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t.shape[0])]))
            elif t.is_floating_point() and name != "slot_of":
                t.copy_(torch.randn(t.shape, generator=g))


def _score64(z: np.ndarray, fn: str) -> np.ndarray:
    if fn == "sqrtsoftplus":
        return np.sqrt(np.log1p(np.exp(z)))
    if fn == "sigmoid":
        return 1 / (1 + np.exp(-z))
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("fn", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_learned_router_matches_float64(fn):
    cfg = _cfg(scoring_func=fn, routed_scaling_factor=1.5)
    router = Router(cfg, layer=1)
    _fill(router, 1)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    weights, indices = router(x, torch.zeros(20, dtype=torch.long))
    s = _score64(x.double().numpy() @ router.weight.double().numpy().T, fn)
    biased = s + router.bias.double().numpy()
    for t in range(20):
        chosen = np.argsort(-biased[t])[:K]  # selection uses the bias...
        assert set(indices[t].tolist()) == set(chosen.tolist())
        w = s[t, indices[t].numpy()]  # ...the weights do not
        np.testing.assert_allclose(weights[t].double().numpy(), 1.5 * w / w.sum(), rtol=1e-5)


def test_hash_router_uses_the_token_table():
    cfg = _cfg()
    router = Router(cfg, layer=0)
    _fill(router, 3)
    ids = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(4))
    x = torch.randn(30, D)
    weights, indices = router(x, ids)
    assert torch.equal(indices, router.tid2eid[ids])
    s = _score64(x.double().numpy() @ router.weight.double().numpy().T, "sqrtsoftplus")
    w = np.take_along_axis(s, indices.numpy(), 1)
    np.testing.assert_allclose(weights.double().numpy(), 1.5 * w / w.sum(1, keepdims=True), rtol=1e-5)


def test_moe_block_matches_float64_swiglu_with_clamp():
    cfg = _cfg()
    moe = MoE(cfg, layer=1)
    _fill(moe, 5)
    x = torch.randn(25, D, generator=torch.Generator().manual_seed(6)) * 3  # big enough to hit the clamp (1.5)
    got = moe(x, torch.zeros(25, dtype=torch.long)).double().numpy()
    weights, indices = moe.gate(x, torch.zeros(25, dtype=torch.long))

    def expert64(h, w1, w2, w3):
        gate, up = np.minimum(h @ w1.T, 1.5), np.clip(h @ w3.T, -1.5, 1.5)
        return (gate / (1 + np.exp(-gate)) * up) @ w2.T

    xs = x.double().numpy()
    bank = {n: getattr(moe.experts, n).double().numpy() for n in ("w1", "w2", "w3")}
    sh = moe.shared_experts
    want = expert64(xs, sh.w1.weight.double().numpy(), sh.w2.weight.double().numpy(), sh.w3.weight.double().numpy())
    for t in range(25):
        for j in range(K):
            e = int(indices[t, j])
            want[t] += float(weights[t, j]) * expert64(xs[t:t + 1], bank["w1"][e], bank["w2"][e], bank["w3"][e])[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_banks_split_any_way_sum_to_the_full_bank():
    """Expert shards hold subsets; the per-token sums they return add up to the single-bank result."""
    cfg = _cfg()
    full = ExpertBank(cfg)
    _fill(full, 7)
    x = torch.randn(40, D)
    weights = torch.rand(40, K)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(40)])
    parts = [[0, 5, 7], [1, 2, 3, 4], [6, 8, 9, 10, 11]]
    total = torch.zeros_like(x)
    for ids in parts:
        bank = ExpertBank(cfg, ids)
        with torch.no_grad():
            for n in ("w1", "w2", "w3"):
                getattr(bank, n).copy_(getattr(full, n)[ids])
        total += bank(x, indices, weights)
    torch.testing.assert_close(total, full(x, indices, weights), rtol=1e-5, atol=1e-6)
    assert ExpertBank(cfg, [0])(x, torch.full((40, K), -1), weights).abs().max() == 0  # -1 = no expert


def test_sampling_modes():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, SamplingParams()).tolist() == [1, 0]
    # top_k=1 is greedy whatever the temperature
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1, seed=0)).tolist() == [1, 0]
    # top_p small keeps only the most likely token
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=0)).tolist() == [1, 0]
    # a seed reproduces; the empirical distribution follows softmax(logits / T)
    p = SamplingParams(temperature=2.0, seed=123)
    many = logits[:1].expand(4000, -1)
    a, b = sample(many, p, p.generator("cpu")), sample(many, p, p.generator("cpu"))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).double() / 4000
    want = torch.softmax(logits[0].double() / 2.0, -1)
    assert (freq - want).abs().max() < 0.03
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
