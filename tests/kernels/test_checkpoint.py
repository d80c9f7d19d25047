"""Checkpoint reading: selective loads proven by instrumentation, transformers' save_pretrained output, bad files."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.kernels import checkpoint as ckpt_mod
from moemesh.kernels import quant
from moemesh.kernels.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, save_checkpoint
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.tiny import TINY_CONFIG, init_tensors
from moemesh.kernels.weights import canonical_name, expert_of, tensor_shapes


@pytest.fixture
def spy(monkeypatch):
    """Records every (file name, stored tensor name) safetensors reads and every header we parse, below our hooks."""
    seen = {"tensors": [], "headers": []}
    real_open, real_header = ckpt_mod.safe_open, ckpt_mod.read_header

    class SpyFile:
        def __init__(self, path, **kw):
            self.path, self.f = path, real_open(path, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            seen["tensors"].append((self.path.name, name))
            return self.f.get_tensor(name)

    def spy_header(path):
        seen["headers"].append(path.name)
        return real_header(path)

    monkeypatch.setattr(ckpt_mod, "safe_open", SpyFile)
    monkeypatch.setattr(ckpt_mod, "read_header", spy_header)
    return seen


def _weight_map(path):
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


# ---- selective loading ---------------------------------------------------------------------------------------------
def test_two_experts_read_only_their_tensors_and_files(tiny_model_dir, spy):
    hook = []
    ckpt = Checkpoint(tiny_model_dir, on_read=lambda f, n: hook.append((f.name, n)))
    assert ckpt.files_opened == set() and spy["headers"] == []  # the index alone maps the names
    out = ckpt.read_experts(2, [3, 11])

    stored = {f"layers.2.ffn.experts.{e}.{w}.{s}" for e in (3, 11) for w in ("w1", "w2", "w3") for s in ("weight",
                                                                                                       "scale")}
    wmap = _weight_map(tiny_model_dir)
    files = {wmap[n] for n in stored}
    assert sorted(spy["tensors"]) == sorted((wmap[n], n) for n in stored)  # each needed tensor once, nothing else
    assert sorted(hook) == sorted(spy["tensors"])
    assert set(spy["headers"]) == files and {p.name for p in ckpt.files_opened} == files
    assert len(set(wmap.values())) > len(files) + 3  # a multi-file checkpoint, most of it untouched
    assert sorted(out) == sorted(n.replace(".scale", ".weight") for n in stored if n.endswith(".weight"))
    w1 = out["layers.2.ffn.experts.3.w1.weight"]
    assert w1.dtype == torch.float32 and w1.shape == (TINY_CONFIG["moe_intermediate_size"],
                                                      TINY_CONFIG["hidden_size"])
    raw = load_file(tiny_model_dir / wmap["layers.2.ffn.experts.3.w1.weight"])
    assert torch.equal(w1, quant.dequant_fp4(raw["layers.2.ffn.experts.3.w1.weight"],
                                             raw["layers.2.ffn.experts.3.w1.scale"]))


def test_non_expert_load_excludes_every_routed_expert(tiny_model_dir, spy):
    ckpt = Checkpoint(tiny_model_dir)
    out = ckpt.read_non_experts(dtype=torch.bfloat16)
    assert spy["tensors"] and all(expert_of(canonical_name(n)) is None for _, n in spy["tensors"])
    assert set(out) == set(tensor_shapes(ckpt.config, routed_experts=False))
    assert out["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert out["layers.0.ffn.gate.tid2eid"].dtype == torch.int64  # integer tensors keep their dtype
    no_tables = ckpt.non_expert_names(engram_tables=False)
    assert not any(".engram.embed." in n for n in no_tables) and "layers.1.engram.key_proj.weight" in no_tables


def test_raw_read_keeps_stored_formats(tiny_model_dir):
    out = Checkpoint(tiny_model_dir).read(["layers.1.attn.wq_b.weight", "layers.1.ffn.experts.0.w2.weight",
                                           "norm.weight"], dequantize=False)
    assert out["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert out["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert out["layers.1.ffn.experts.0.w2.weight"].dtype == torch.int8
    assert out["layers.1.ffn.experts.0.w2.weight"].shape == (TINY_CONFIG["hidden_size"],
                                                             TINY_CONFIG["moe_intermediate_size"] // 2)


# ---- writing and reading back --------------------------------------------------------------------------------------
def _small_cfg(**over) -> ModelConfig:
    return ModelConfig.from_dict({**TINY_CONFIG, "vocab_size": 64, "engram_layer_ids": [], **over})


@pytest.fixture(scope="module")
def small():
    cfg = _small_cfg()
    return cfg, init_tensors(cfg, dtype="float32")


def test_round_trip_single_file_and_sharded(small, tmp_path):
    cfg, tensors = small
    save_checkpoint(tensors, cfg, tmp_path / "one")
    assert not (tmp_path / "one" / INDEX_FILE).exists()
    back = Checkpoint(tmp_path / "one").read_all()
    assert all(torch.equal(back[n], t) for n, t in tensors.items())

    save_checkpoint(tensors, cfg, tmp_path / "q", quantize="v4", max_shard_bytes=32 * 1024)
    assert len(set(_weight_map(tmp_path / "q").values())) > 2
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["expert_dtype"] == "fp4"
    back = Checkpoint(tmp_path / "q").read_all()
    w = tensors["layers.3.attn.wo_b.weight"]
    assert torch.equal(back["layers.3.attn.wo_b.weight"], quant.dequant_fp8(*quant.quant_fp8(w)))
    e = tensors["layers.3.ffn.experts.15.w3.weight"]
    assert torch.equal(back["layers.3.ffn.experts.15.w3.weight"], quant.dequant_fp4(*quant.quant_fp4(e)))
    assert torch.equal(back["hc_head_fn"], tensors["hc_head_fn"])


def test_scale_in_another_shard(good):
    tensors = load_file(good / "model.safetensors")
    want = quant.dequant_fp8(tensors["layers.1.attn.wq_a.weight"], tensors["layers.1.attn.wq_a.scale"])
    scale = {"layers.1.attn.wq_a.scale": tensors.pop("layers.1.attn.wq_a.scale")}
    (good / "model.safetensors").unlink()
    save_file(tensors, good / "a.safetensors")
    save_file(scale, good / "b.safetensors")
    index = {"weight_map": {**{n: "a.safetensors" for n in tensors}, **{n: "b.safetensors" for n in scale}}}
    (good / INDEX_FILE).write_text(json.dumps(index))
    ckpt = Checkpoint(good)
    got = ckpt.read(["layers.1.attn.wq_a.weight", "layers.1.attn.wq_a.scale", "norm.weight"])
    assert torch.equal(got["layers.1.attn.wq_a.weight"], want) and len(got) == 3
    assert {p.name for p in ckpt.files_opened} == {"a.safetensors", "b.safetensors"}


def test_progress_bar_on_request(small, tmp_path, capsys):
    cfg, tensors = small
    save_checkpoint(tensors, cfg, tmp_path)
    Checkpoint(tmp_path).read(["embed.weight", "norm.weight"], progress=True)
    assert "reading" in capsys.readouterr().err


# ---- transformers' save_pretrained ---------------------------------------------------------------------------------
# transformers module names -> canonical names (the inverse of its deepseek_v4 conversion mapping, written out here)
_HF_TO_CANONICAL = [
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.sinks$", ".attn_sink"), (r"\.position_bias$", ".ape"), (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."), (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."), (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."), (r"\.q_a_norm\.", ".q_norm."), (r"\.kv_norm\.", ".norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"), (r"\.shared_experts\.wgate\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."), (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
]


def _hf_state_as_canonical(state: dict, n_inter: int) -> dict:
    out = {}
    for name, t in state.items():
        name = canonical_name(name)
        for pat, rep in _HF_TO_CANONICAL:
            name = re.sub(pat, rep, name)
        m = re.match(r"^(layers\.\d+\.ffn\.experts)\.(gate_up_proj|down_proj)$", name)
        if not m:
            out[name] = t
            continue
        for e in range(t.shape[0]):  # gate_up_proj [E, 2I, D] = cat(w1, w3); down_proj [E, D, I] = w2
            if m.group(2) == "gate_up_proj":
                out[f"{m.group(1)}.{e}.w1.weight"], out[f"{m.group(1)}.{e}.w3.weight"] = t[e, :n_inter], t[e, n_inter:]
            else:
                out[f"{m.group(1)}.{e}.w2.weight"] = t[e]
    return out


def test_reads_transformers_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV4Config(
        vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        head_dim=32, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, hc_mult=2, sliding_window=8,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={"compressed_sparse_attention": 4,
                                                                   "heavily_compressed_attention": 8},
        o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=16, index_topk=4, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(hf_cfg).float()
    with torch.no_grad():  # no zero/one initialisations left: every tensor must be told apart
        for name, t in model.state_dict().items():
            t.copy_(torch.randint(0, 4, t.shape) if name.endswith("tid2eid") else torch.randn(t.shape))
    model.save_pretrained(tmp_path)
    want = _hf_state_as_canonical(model.state_dict(), hf_cfg.moe_intermediate_size)

    got = Checkpoint(tmp_path).read_all()
    assert set(got) == set(want) == set(tensor_shapes(Checkpoint(tmp_path).config))
    for name, t in want.items():
        assert torch.equal(got[name], t), name


# ---- bad checkpoints -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def templates(small, tmp_path_factory):
    """Written once; each test breaks its own copy."""
    cfg, tensors = small
    root = tmp_path_factory.mktemp("templates")
    save_checkpoint(tensors, cfg, root / "ckpt", quantize="v4")
    save_checkpoint(tensors, cfg, root / "sharded", quantize="v4", max_shard_bytes=32 * 1024)
    return root


@pytest.fixture
def good(templates, tmp_path):
    return Path(shutil.copytree(templates / "ckpt", tmp_path / "ckpt"))


@pytest.fixture
def sharded(templates, tmp_path):
    return Path(shutil.copytree(templates / "sharded", tmp_path / "sharded"))


def _rewrite(path, edit):
    """Apply `edit(dict of stored tensors)` to a single-file checkpoint."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(good):
    _rewrite(good, lambda t: t.pop("layers.2.attn.compressor.ape"))
    with pytest.raises(CheckpointError, match=r"ckpt: tensor 'layers\.2\.attn\.compressor\.ape' is missing"):
        Checkpoint(good)


def test_missing_tensor_in_index(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    del index["weight_map"]["layers.1.attn.indexer.wq_b.weight"]
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'layers\.1\.attn\.indexer\.wq_b\.weight' is "
                                              r"missing"):
        Checkpoint(sharded)


def test_index_points_to_missing_file(sharded):
    victim = _weight_map(sharded)["layers.3.ffn.experts.0.w1.weight"]
    (sharded / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: tensor '.*' points to missing file '{victim}'"):
        Checkpoint(sharded)


def test_index_names_a_tensor_its_file_lacks(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    wmap = index["weight_map"]
    wmap["layers.3.ffn.gate.bias"] = next(f for f in wmap.values() if f != wmap["layers.3.ffn.gate.bias"])
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor 'layers\.3\.ffn\.gate\.bias' "
                                              r"is listed in"):
        Checkpoint(sharded).read(["layers.3.ffn.gate.bias"])


@pytest.mark.parametrize("name, bad, match", [
    ("layers.1.ffn.gate.weight", torch.zeros(16, 63),
     r"tensor 'layers\.1\.ffn\.gate\.weight' \(F32\) has shape \[16, 63\], expected \[16, 64\]"),
    ("layers.1.ffn.experts.4.w2.weight", torch.zeros(64, 32, dtype=torch.int8),  # unpacked width: wrong for FP4
     r"tensor 'layers\.1\.ffn\.experts\.4\.w2\.weight' \(I8\) has shape \[64, 32\], expected \[64, 16\]"),
    ("layers.1.attn.wq_a.scale", torch.ones(1, 2), r"scale tensor 'layers\.1\.attn\.wq_a\.scale' has shape \[1, 2\]"),
])
def test_wrong_shape(good, name, bad, match):
    _rewrite(good, lambda t: t.__setitem__(name, bad))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: " + match):
        Checkpoint(good)


def test_fp8_weight_without_scale(good):
    _rewrite(good, lambda t: t.pop("layers.0.attn.wo_a.scale"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: FP8 tensor 'layers\.0\.attn\.wo_a\.weight' has "
                                              r"no scale"):
        Checkpoint(good)


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "llama", r"model_type.*'llama'"),
    ("num_experts_per_tok", 99, r"num_experts_per_tok: 99 > n_routed_experts"),
    ("hidden_size", -4, r"hidden_size.*-4"),
])
def test_bad_config(good, field, value, match):
    cfg = json.loads((good / "config.json").read_text())
    cfg[field] = value
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json: .*" + match):
        Checkpoint(good)


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json: no config\.json"):
        Checkpoint(good)


def test_truncated_data(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*': data ends at byte \d+ but the file "
                                              r"holds \d+ bytes"):
        Checkpoint(good)


@pytest.mark.parametrize("content, match", [
    (b"\x05\x00", r"truncated safetensors file \(2 bytes"),
    ((10 ** 6).to_bytes(8, "little") + b"{}", r"header length 1000000 does not fit the file size 10"),
    ((6).to_bytes(8, "little") + b"{nope}", r"not valid JSON"),
    ((19).to_bytes(8, "little") + b'{"x": {"dtype": 1}}', r"entry for tensor 'x' is malformed"),
])
def test_corrupt_header(good, content, match):
    (good / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*" + match):
        Checkpoint(good)


def test_corrupt_shard_named_when_read(sharded):
    victim = _weight_map(sharded)["layers.2.ffn.experts.1.w1.weight"]
    (sharded / victim).write_bytes(b"\xff" * 7)
    ckpt = Checkpoint(sharded)  # index-only open: the shard is not touched yet
    with pytest.raises(CheckpointError, match=rf"{victim}: truncated safetensors file"):
        ckpt.read_experts(2, [1])


def test_duplicate_aliases_and_bad_selectors(good):
    _rewrite(good, lambda t: t.__setitem__("model.embed_tokens.weight", t["embed.weight"].clone()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' duplicates .*\(both are 'embed"):
        Checkpoint(good)
    shutil.rmtree(good)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Checkpoint(good)


def test_selector_ranges(tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    with pytest.raises(CheckpointError, match="expert 16 out of range"):
        ckpt.expert_names(1, [0, 16])
    with pytest.raises(CheckpointError, match="layer 9 out of range"):
        ckpt.read_experts(9, [0])
    with pytest.raises(CheckpointError, match="'nope' is not in the checkpoint"):
        ckpt.read(["nope"])


def test_save_checks_names_and_shapes(small, tmp_path):
    cfg, tensors = small
    with pytest.raises(CheckpointError, match="tensor 'norm.weight' is missing"):
        save_checkpoint({k: v for k, v in tensors.items() if k != "norm.weight"}, cfg, tmp_path)
    with pytest.raises(CheckpointError, match=r"'norm\.weight' has shape \[3\]"):
        save_checkpoint({**tensors, "norm.weight": torch.ones(3)}, cfg, tmp_path)
