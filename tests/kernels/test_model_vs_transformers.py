"""Our DeepSeek-V4 against transformers' `DeepseekV4ForCausalLM` (the independent reference), float32.

Checkpoints are written by transformers itself (`save_pretrained` of a random tiny config), with every parameter
re-drawn at random (transformers initialises sinks, ape, biases and hash tables to zero, which would hide bugs).
Tolerance: max |ours - ref| / max |ref| <= 1e-4.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

import moemesh  # noqa: E402

TOL = 1e-4
S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

CONFIGS = {
    # hc 2; all three attention types; hash + learned routing; YaRN on the compressed rope; the indexer keeps 8 of up
    # to 80 compressed entries; HCA windows of 16 tokens.
    "hc2_yarn_sqrtsoftplus": dict(
        hc_mult=2, layer_types=[S, C, H, C, H], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        compress_rates={C: 4, H: 16}, sliding_window=16, index_topk=8, scoring_func="sqrtsoftplus",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # hc 4; sigmoid scores; a CSA layer first; other rates and window.
    "hc4_sigmoid": dict(
        hc_mult=4, layer_types=[C, S, H, C], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={C: 4, H: 8}, sliding_window=12, index_topk=16, scoring_func="sigmoid",
    ),
    # HCA first, plain rope, a long HCA window. (transformers has no `softmax` scoring: see test_moe.py.)
    "hc4_hca_first": dict(
        hc_mult=4, layer_types=[H, C, S], mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={C: 4, H: 32}, sliding_window=20, index_topk=6, scoring_func="sqrtsoftplus",
    ),
}


def _config(**over) -> DeepseekV4Config:
    base = dict(vocab_size=97, hidden_size=48, moe_intermediate_size=24, num_attention_heads=4, head_dim=32,
                q_lora_rank=40, n_routed_experts=16, num_experts_per_tok=3, partial_rotary_factor=0.5, o_groups=2,
                o_lora_rank=16, index_n_heads=3, index_head_dim=24, hc_sinkhorn_iters=20)
    base.update(over)
    base["num_hidden_layers"] = len(base["layer_types"])
    return DeepseekV4Config(**base)


def _randomize(model: DeepseekV4ForCausalLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("tid2eid"):
                E = model.config.n_routed_experts
                rows = [torch.randperm(E, generator=g)[: t.shape[1]] for _ in range(t.shape[0])]
                t.copy_(torch.stack(rows))
            elif name.endswith(("layernorm.weight", "norm.weight", "q_a_norm.weight", "kv_norm.weight")):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith(("scale", "hc_scale")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:  # matrices, sinks, ape, hc base, gate bias: O(1) activations with a 1/sqrt(fan_in) scale
                fan_in = t.shape[-1] if t.dim() > 1 else 4
                t.copy_(torch.randn(t.shape, generator=g) * fan_in ** -0.5)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(reference transformers model, our model loaded from the checkpoint transformers wrote)."""
    ref = DeepseekV4ForCausalLM(_config(**CONFIGS[request.param]))
    _randomize(ref, seed=hash(request.param) % 1000)
    ref.eval()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, moemesh.load_model(path, dtype=torch.float32, device="cpu")


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@contextlib.contextmanager
def _reference():
    """Run the reference without grad and with ties in `Tensor.topk` going to the lower index. The reference's
    indexer keeps its top-k entries with torch.topk, whose pick among exactly equal scores (relu makes score 0
    common) is unspecified and changes with the pool size; ours takes the lower entry index, so that chunked and
    whole prefill select alike. Same scores, same k: only the choice among equals is pinned down."""
    original = torch.Tensor.topk

    def topk(self, k, dim=-1, largest=True, sorted=True):
        idx = torch.sort(self, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.return_types.topk((self.gather(dim, idx), idx))

    torch.Tensor.topk = topk
    try:
        with torch.no_grad():
            yield
    finally:
        torch.Tensor.topk = original


def test_prefill_batch_of_different_lengths(pair):
    ref, ours = pair
    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = [310, 257, 131]
    ids = torch.randint(0, V, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    mask[2] = 0
    mask[2, 40:40 + lengths[2]] = 1  # one left-and-right padded row too
    logits = ours(ids, attention_mask=mask)
    for b in range(len(lengths)):
        span = mask[b].bool()
        with _reference():
            expected = ref(ids[b, span][None]).logits[0]
        assert _rel_err(logits[b, span], expected) <= TOL, f"row {b}"
        if (~span).any():
            assert logits[b, ~span].abs().max().item() == 0


def test_prefill_equal_lengths_batched_on_both_sides(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    with _reference():
        expected = ref(ids).logits
    assert _rel_err(ours(ids), expected) <= TOL


def test_cached_decode_matches_reference_cached_decode(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(2))
    caches = [ours.new_cache() for _ in range(2)]
    with _reference():
        out = ref(ids, use_cache=True)
    past, expected = out.past_key_values, out.logits
    assert _rel_err(ours(ids, caches=caches), expected) <= TOL
    token = expected[:, -1].argmax(-1, keepdim=True)
    for step in range(20):  # crosses several CSA (4) and HCA (8..32) window boundaries and the sliding window
        with _reference():
            out = ref(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        got = ours(token, caches=caches)
        assert _rel_err(got, out.logits) <= TOL, f"decode step {step}"
        token = out.logits[:, -1].argmax(-1, keepdim=True)


def test_generate_greedy_equals_reference_generate(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
    with _reference():
        expected = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=16)
    got = ours.generate(ids, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(got, expected)
