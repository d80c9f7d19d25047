"""The built-in tiny model: `moemesh init-model tiny` writes a loadable, deterministic checkpoint and tokenizer."""

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

from moemesh.cluster import cli
from moemesh.kernels import quant
from moemesh.kernels.checkpoint import INDEX_FILE, Checkpoint
from moemesh.kernels.config import CSA, HCA, SLIDING
from moemesh.kernels.engram import EngramHasher
from moemesh.kernels.tiny import write_tiny_model

TEXTS = ["The expert shards serve Engram tables.", "  spaces\tand\nnewlines  ", "Ünïcödé ✓ 混合专家 🙂", ""]


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    done = subprocess.run([sys.executable, "-c", "from moemesh.cluster.cli import main; raise SystemExit(main())",
                           "init-model", "tiny", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote the tiny model" in done.stdout
    return out


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "moemesh"]
    assert ep.value == "moemesh.cluster.cli:main"


def test_two_runs_are_byte_identical(cli_model_dir, tiny_model_dir):
    """One run in a fresh process (the CLI), one in this process (the session fixture)."""
    names = sorted(p.name for p in cli_model_dir.iterdir())
    assert names == sorted(p.name for p in tiny_model_dir.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 4 and INDEX_FILE in names
    for name in names:
        assert (cli_model_dir / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_loads_with_the_promised_shape(cli_model_dir):
    ckpt = Checkpoint(cli_model_dir)
    cfg = ckpt.config
    assert set(cfg.layer_types) == {SLIDING, CSA, HCA} and cfg.num_hidden_layers >= 4
    assert cfg.mlp_layer_types[0] == "hash_moe" and cfg.mlp_layer_types[-1] == "moe"
    assert cfg.n_routed_experts >= 16 and cfg.num_experts_per_tok >= 2 and cfg.hc_mult >= 2
    assert len(cfg.engram_layer_ids) == 2 and cfg.rope("compress").rope_type == "yarn"
    assert cfg.index_topk < 200 // cfg.compress_rates[CSA] and cfg.sliding_window < 200 // 4
    assert cfg.rope_head_dim < cfg.head_dim  # partial rope
    tensors = ckpt.read_all()
    assert set(tensors) == set(ckpt.names())
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    tid2eid = tensors["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in tid2eid.tolist())  # distinct experts per token
    assert tid2eid.unique().numel() == cfg.n_routed_experts


def test_stored_like_a_v4_release(cli_model_dir):
    raw = Checkpoint(cli_model_dir).read(["layers.1.attn.wq_a.weight", "layers.3.ffn.shared_experts.w2.weight",
                                          "layers.3.ffn.experts.9.w1.weight", "embed.weight", "hc_head_fn"],
                                         dequantize=False)
    assert raw["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.3.ffn.shared_experts.w2.weight"].dtype == torch.float8_e4m3fn
    assert raw["layers.3.ffn.experts.9.w1.weight"].dtype == torch.int8  # packed FP4
    assert raw["layers.3.ffn.experts.9.w1.scale"].dtype == torch.float8_e8m0fnu
    assert raw["embed.weight"].dtype == torch.bfloat16 and raw["hc_head_fn"].dtype == torch.float32


def test_engram_tables_match_the_hasher(cli_model_dir):
    ckpt = Checkpoint(cli_model_dir)
    hasher = EngramHasher.from_model_config(ckpt.config, cli_model_dir)
    for layer in ckpt.config.engram_layer_ids:
        rows = ckpt.read([f"layers.{layer}.engram.embed.weight"])[f"layers.{layer}.engram.embed.weight"]
        assert rows.shape == (sum(hasher.table_sizes(layer)), ckpt.config.engram_head_dim)


def test_tokenizer_round_trips_and_matches_config(cli_model_dir):
    cfg = Checkpoint(cli_model_dir).config
    tok = Tokenizer.from_file(str(cli_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg.vocab_size
    assert [tok.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")] == [cfg.bos_token_id, cfg.eos_token_id,
                                                                          cfg.engram_pad_id]
    for text in TEXTS:
        enc = tok.encode(text)
        assert enc.ids[0] == cfg.bos_token_id
        assert tok.decode(enc.ids) == text
    assert len(tok.encode(TEXTS[0], add_special_tokens=False).ids) < len(TEXTS[0]) / 2  # merges learned
    tok_cfg = json.loads((cli_model_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<bos>", "<eos>", "<pad>")


def test_float32_variant_holds_the_same_weights(tiny_model_dir, tmp_path):
    f32 = Checkpoint(write_tiny_model(tmp_path / "f32", dtype="float32")).read_all()
    v4 = Checkpoint(tiny_model_dir).read_all()
    for name in ("layers.2.attn.wo_b.weight", "layers.1.ffn.experts.5.w2.weight"):
        q = quant.quant_fp8 if ".attn." in name else quant.quant_fp4
        assert torch.equal(v4[name], quant.dequantize(*q(f32[name])))
    assert torch.equal(v4["embed.weight"], f32["embed.weight"].bfloat16().float())
    assert torch.equal(v4["layers.3.hc_ffn_fn"], f32["layers.3.hc_ffn_fn"])


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["init-model", "tiny", "--out", str(tiny_model_dir)]) == 2  # not empty, no --force
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert cli.main(["init-model", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["init-model", "huge", "--out", str(tmp_path)])
    assert e.value.code == 2
