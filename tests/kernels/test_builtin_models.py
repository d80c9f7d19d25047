"""The built-in models with DeepSeek-V4-Flash's structure (`v4-flash-mini`, `v4.1-flash-mini`) and the registry.

Their configs are checked at full size (layer pattern, counts, parameters, Engram bytes, memory). Writing and the
transformers parity run on each model's structure at reduced width (same layer_types, experts, top-k, hash layers,
hc streams and Engram layers; `narrow`), through the same writer: the full-size models take about a minute to write
and their parity check is `python -m moemesh.cluster.bench.parity --model NAME` (timings in docs/checkpoints.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.cluster.bench import parity
from moemesh.cluster.serve.app import resolve_model
from moemesh.kernels.builtin import BUILTIN_MODELS, builtin_model, write_builtin_model
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.config import CSA, HCA, SLIDING
from moemesh.kernels.synthetic import BuiltinModel, param_count, write_model
from moemesh.kernels.weights import tensor_shapes

MINIS = ["v4-flash-mini", "v4.1-flash-mini"]
GIB = 1 << 30
# widths only: heads, experts, top-k, layers, windows, rates stay
NARROW = {"hidden_size": 64, "moe_intermediate_size": 16, "head_dim": 16, "q_lora_rank": 16, "o_lora_rank": 16,
          "index_head_dim": 4}
NARROW_ENGRAM = {"engram_vocab_size": [1024, 1024], "engram_head_dim": 8}


def narrow(name: str) -> BuiltinModel:
    model = builtin_model(name)
    extra = NARROW_ENGRAM if "engram_layer_ids" in model.config else {}
    return BuiltinModel(f"{name}-narrow", {**model.config, **NARROW, **extra}, {"v4": 1 << 20, "float32": 4 << 20,
                                                                              "bfloat16": 2 << 20})


@pytest.fixture(scope="module", params=MINIS)
def narrow_f32(request, tmp_path_factory):
    """(name, float32 checkpoint of the model's structure at reduced width), written once per module."""
    return request.param, write_model(narrow(request.param), tmp_path_factory.mktemp(request.param), "float32")


# ---- the registry ---------------------------------------------------------------------------------------------------
def test_registry_lists_every_builtin_by_its_name():
    assert list(BUILTIN_MODELS) == ["tiny", *MINIS]
    assert all(m.name == n and m.summary for n, m in BUILTIN_MODELS.items())
    with pytest.raises(ValueError, match=r"'v5-mini' is not a built-in model \(tiny, v4-flash-mini"):
        builtin_model("v5-mini")


def test_serve_resolves_every_builtin_name(tmp_path):
    """tiny is written into the cache (then reused); the minis resolve to their cached copy (written by the run
    that first served them: here planted, since writing one takes a minute)."""
    first = resolve_model("tiny", cache=tmp_path)
    assert Checkpoint(first).config.num_hidden_layers == 4 and [p.name for p in tmp_path.iterdir()] == ["tiny"]
    assert resolve_model("tiny", cache=tmp_path) == first
    for name in MINIS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        assert resolve_model(name, cache=tmp_path) == str(tmp_path / name)
    with pytest.raises(ValueError, match=r"'v5-mini' is neither a built-in model \(tiny, v4-flash-mini, "):
        resolve_model("v5-mini", cache=tmp_path)


# ---- the full-size configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,layers,experts", [("v4-flash-mini", 43, 256), ("v4.1-flash-mini", 40, 384)])
def test_v4_flash_structure(name, layers, experts):
    cfg = builtin_model(name).model_config()
    assert cfg.num_hidden_layers == layers and cfg.layer_types[:2] == [SLIDING, SLIDING]
    assert cfg.layer_types[2:] == [CSA, HCA] * ((layers - 2) // 2) + [CSA] * (layers % 2)
    assert cfg.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * (layers - 3)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.hc_mult) == (experts, 6, 1, 4)
    assert cfg.compress_rates == {CSA: 4, HCA: 128} and (cfg.sliding_window, cfg.index_topk) == (128, 512)
    assert (cfg.num_attention_heads, cfg.index_n_heads, cfg.o_groups) == (64, 64, 8)
    assert cfg.rope_head_dim * 8 == cfg.head_dim and cfg.rope("compress").factor == 16
    shapes = tensor_shapes(cfg)
    assert sum(n.endswith(".ffn.experts.0.w1.weight") for n in shapes) == layers
    assert f"layers.{layers - 1}.ffn.experts.{experts - 1}.w2.weight" in shapes


@pytest.mark.parametrize("name", MINIS)
def test_size_fits_the_budget(name):
    """0.5-1.5 B parameters besides Engram; a monolithic and a served copy in float32 fit in 24 GiB."""
    cfg = builtin_model(name).model_config()
    dense = param_count(cfg, engram_tables=False)
    assert 0.5e9 <= dense <= 1.5e9
    assert 2 * dense * 4 <= 24 * GIB
    routed = cfg.num_hidden_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert 0.9 < routed / dense < 1  # the routed experts are (almost) all of it, as in V4-Flash


def test_v41_engram_tables_outweigh_the_rest():
    cfg = builtin_model("v4.1-flash-mini").model_config()
    assert cfg.engram_layer_ids == [1, 14]
    tables = param_count(cfg) - param_count(cfg, engram_tables=False)
    assert tables * 2 >= 2 * GIB  # bf16, as `v4` stores them
    assert tables > param_count(cfg, engram_tables=False)  # more bytes than the rest in any one dtype
    v4_rest = param_count(cfg, engram_tables=False) * 0.6  # FP4 experts (+ scales) dominate the v4 rest
    assert tables * 2 > 2 * v4_rest


# ---- writing (reduced width, same writer) ---------------------------------------------------------------------------
def test_v4_write_is_sharded_and_quantized(tmp_path):
    """v4.1's structure (the most experts, Engram); the writer's determinism is test_tiny.py's (same writer)."""
    a = write_model(narrow("v4.1-flash-mini"), tmp_path / "a")
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    shards = [a / f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and not list(a.glob(".shard-*"))
    ckpt = Checkpoint(a)
    ckpt.validate()
    raw = ckpt.read(["layers.39.ffn.experts.383.w1.weight", "layers.5.attn.wq_b.weight",
                     "layers.14.engram.embed.weight"], dequantize=False)
    assert raw["layers.39.ffn.experts.383.w1.weight"].dtype == torch.int8  # packed FP4
    assert raw["layers.5.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.14.engram.embed.weight"].dtype == torch.bfloat16


def test_engram_tables_serve_from_memory_maps(narrow_f32, tmp_path):
    name, path = narrow_f32
    if name != "v4.1-flash-mini":
        pytest.skip("no Engram")
    from moemesh.actors.engram.service import EngramShard, engram_layout

    ckpt = Checkpoint(path)
    ranges = engram_layout(ckpt.config, 2)[1]
    shard = EngramShard.from_checkpoint(path, ranges, mmap_dir=tmp_path)
    for layer, (start, end) in ranges.items():
        table = ckpt.read([f"layers.{layer}.engram.embed.weight"])[f"layers.{layer}.engram.embed.weight"]
        assert shard.slices[layer].path is not None
        assert torch.equal(shard.slices[layer].rows, table[start:end])


# ---- parity with transformers (reduced width) -----------------------------------------------------------------------
def test_matches_transformers_prefill_and_cached_decode(narrow_f32):
    """Prefill of 120 tokens, then 12 cached decode steps: across the 128-token sliding window and the first
    128-token HCA block. Tolerance as for every transformers comparison: 1e-4 of the largest logit."""
    _, path = narrow_f32
    report = parity.check(path, prompt_len=120, decode_steps=12)
    assert report["prefill"] <= parity.TOL and report["decode"] <= parity.TOL, report
    assert math.isfinite(report["prefill"]) and report["prefill"] > 0  # two implementations, not one


def test_engram_reference_hook_changes_the_logits(narrow_f32):
    """The reference's Engram hook is live: without it, transformers disagrees with our Engram model."""
    name, path = narrow_f32
    if name != "v4.1-flash-mini":
        pytest.skip("no Engram")
    ref, hooks = parity.load_reference(path)
    ids = torch.randint(3, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    hooks.history = ids
    with torch.no_grad():
        with_engram = ref(ids).logits
        for layer in hooks.weights:
            ref.model.layers[layer]._forward_pre_hooks.clear()
        without = ref(ids).logits
    assert parity._rel_err(without, with_engram) > 100 * parity.TOL


def test_write_builtin_model_by_name(tmp_path):
    out = write_builtin_model("tiny", tmp_path / "t", "bfloat16")
    assert Checkpoint(out).read(["embed.weight"], dtype=torch.bfloat16)["embed.weight"].dtype == torch.bfloat16
