"""Engram: hashing reproduces DeepSeek's demo exactly; tables, gate and conv checked against float64 references written
from the formulas (docs/engram.md), not from the module's helpers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.kernels.config import ModelConfig
from moemesh.kernels.engram import (EngramGate, EngramHasher, EngramMemory, _is_prime, engram_param_shapes,
                                    engram_table_sizes)
from moemesh.kernels.weights import tensor_shapes


def _testdata() -> Path:
    candidates = [Path(__file__).resolve().parents[3] / "shared/testdata/engram"]
    if os.environ.get("MOEMESH_SHARED"):
        candidates.append(Path(os.environ["MOEMESH_SHARED"]) / "testdata/engram")
    candidates.append(Path("/work/shared/testdata/engram"))
    for c in candidates:
        if (c / "hash_known_answers.json").is_file():
            return c
    pytest.fail(f"Engram known answers not found in {[str(c) for c in candidates]}")


DATA = _testdata()
KNOWN = json.loads((DATA / "hash_known_answers.json").read_text())


@pytest.fixture(scope="module")
def hasher() -> EngramHasher:
    return EngramHasher.from_config(KNOWN["config"], DATA)


def _cfg(form: str = "v4.1", **kw) -> ModelConfig:
    c = KNOWN["config"]
    base = dict(hidden_size=16, num_hidden_layers=4, hc_mult=3, rms_norm_eps=1e-6, engram_layer_ids=c["layer_ids"],
                engram_vocab_size=c["engram_vocab_size"], engram_max_ngram_size=c["max_ngram_size"],
                engram_n_heads=c["n_head_per_ngram"], engram_head_dim=4, engram_pad_id=c["pad_id"],
                engram_seed=c["seed"], engram_kernel_size=4, engram_gate_form=form)
    return ModelConfig(**{**base, **kw})


# ---- hashing: known answers ---------------------------------------------------------------------------------------
def test_compression_table_matches_demo(hasher):
    assert hasher.lookup_table.tolist() == KNOWN["compressed_lookup_table"]
    assert hasher.compressed_vocab_size == KNOWN["compressed_vocab_size"]
    assert hasher.compressed_pad_id == KNOWN["compressed_pad_id"]


def test_compression_keys_partial_utf8_tokens_by_token_string(tmp_path):
    """Byte-level tokens that decode to U+FFFD keep distinct ids; whitespace-only tokens collapse to one space."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<pad>": 0, "\u00c3": 1, "\u00c4": 2, "hello": 3, "\u0120hello": 4, "Hello": 5, "\u0120\u0120": 6,
             "\u010a": 7, "\u00c3\u00a9": 8, "e": 9, "\u0120\u00c3": 10}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    h = EngramHasher.from_config({**KNOWN["config"], "pad_id": 0}, tmp_path)
    assert h.lookup_table.tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 5, 5, 6]
    assert h.compressed_vocab_size == 7


def test_multipliers_and_prime_sizes_match_demo(hasher):
    assert sorted(hasher.multipliers) == sorted(int(l) for l in KNOWN["multipliers"])
    for layer, mults in KNOWN["multipliers"].items():
        assert hasher.multipliers[int(layer)].dtype == np.int64
        assert hasher.multipliers[int(layer)].tolist() == mults
    for layer, sizes in KNOWN["prime_table_sizes"].items():
        assert hasher.table_sizes(int(layer)) == [p for order in sizes for p in order]


@pytest.mark.parametrize("case", range(len(KNOWN["cases"])))
def test_cases_match_demo(hasher, case):
    c = KNOWN["cases"][case]
    comp = hasher.compressed_ids(c["input_ids"])
    assert comp.dtype == np.int64 and comp.tolist() == c["compressed_ids"]
    got = hasher.hash(c["input_ids"])
    assert sorted(got) == sorted(int(l) for l in c["hash_ids"])
    for layer, want in c["hash_ids"].items():
        assert got[int(layer)].dtype == np.int64
        assert got[int(layer)].tolist() == want


def test_model_config_builds_the_same_hasher(hasher):
    cfg = _cfg()
    h2 = EngramHasher.from_model_config(cfg, DATA / "tokenizer.json")
    ids = KNOWN["cases"][1]["input_ids"]
    for layer in cfg.engram_layer_ids:
        assert h2.table_sizes(layer) == hasher.table_sizes(layer) == engram_table_sizes(cfg, layer)
        assert np.array_equal(h2.hash(ids)[layer], hasher.hash(ids)[layer])


def test_hash_equals_python_int_reference(hasher):
    """The formula evaluated with Python ints: int64 wrap-around as an explicit mod 2**64, floor modulo."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(hasher.lookup_table), size=(2, 9))
    got = hasher.hash(ids)
    comp, pad, N = hasher.compressed_ids(ids), hasher.compressed_pad_id, hasher.max_ngram_size

    def wrap(v: int) -> int:
        v %= 2**64
        return v - 2**64 if v >= 2**63 else v

    for layer in hasher.layer_ids:
        m = [int(x) for x in hasher.multipliers[layer]]
        sizes = hasher.table_sizes(layer)
        for b in range(2):
            for t in range(9):
                tok = [int(comp[b, t - k]) if t - k >= 0 else pad for k in range(N)]
                want, mix = [], wrap(tok[0] * m[0])
                for n in range(2, N + 1):
                    mix = wrap(mix ^ wrap(tok[n - 1] * m[n - 1]))
                    want += [mix % p for p in sizes[(n - 2) * hasher.n_heads:(n - 1) * hasher.n_heads]]
                assert got[layer][b, t].tolist() == want


# ---- hashing: incremental and validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 1, 2, 3, 7, 19])
def test_continuation_equals_whole(hasher, split):
    rng = np.random.default_rng(split)
    ids = rng.integers(0, len(hasher.lookup_table), size=(3, 20))
    whole = hasher.hash(ids)
    # full prefix as context, and (when long enough) only its last N-1 tokens
    contexts = [ids[:, :split]]
    if split >= hasher.max_ngram_size - 1:
        contexts.append(ids[:, split - (hasher.max_ngram_size - 1):split])
    for ctx in contexts:
        part = hasher.hash_continuation(ctx, ids[:, split:])
        for layer in hasher.layer_ids:
            assert np.array_equal(part[layer], whole[layer][:, split:])


def test_token_by_token_decoding_equals_whole(hasher):
    ids = np.random.default_rng(5).integers(0, len(hasher.lookup_table), size=(1, 12))
    whole = hasher.hash(ids)
    for t in range(12):
        step = hasher.hash_continuation(ids[:, max(0, t - 2):t], ids[:, t:t + 1])
        for layer in hasher.layer_ids:
            assert np.array_equal(step[layer][:, 0], whole[layer][:, t])


def test_hashing_rejects_bad_ids(hasher):
    with pytest.raises(ValueError, match="ids"):
        hasher.hash([1, 2, 3])
    with pytest.raises(ValueError, match="ids"):
        hasher.hash([[1, len(hasher.lookup_table)]])
    with pytest.raises(ValueError, match="ids"):
        hasher.hash([[1.5, 2.0]])
    assert hasher.hash(np.zeros((2, 0), dtype=np.int64))[1].shape == (2, 0, 8)
    with pytest.raises(ValueError, match="context_ids"):
        hasher.hash_continuation([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="layer_id"):
        hasher.table_sizes(0)
    with pytest.raises(ValueError, match="config"):
        EngramHasher.from_config({"max_ngram_size": 3}, DATA)


def test_is_prime_matches_a_sieve():
    n = 20000
    sieve = np.ones(n, dtype=bool)
    sieve[:2] = False
    for i in range(2, int(n ** 0.5) + 1):
        sieve[i * i::i] = False
    assert [_is_prime(i) for i in range(n)] == sieve.tolist()
    assert _is_prime(2**61 - 1) and not _is_prime(2**61 + 1) and not _is_prime(3215031751)  # strong pseudoprime


# ---- parameters and tables -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["v4.1", "paper"])
def test_param_shapes_match_modules_and_load_by_name(form):
    cfg = _cfg(form)
    layer = cfg.engram_layer_ids[1]
    shapes = engram_param_shapes(cfg, layer)
    D, S = cfg.hidden_size, cfg.hc_mult
    assert shapes["embed.weight"] == (sum(KNOWN["prime_table_sizes"][str(layer)][0] +
                                          KNOWN["prime_table_sizes"][str(layer)][1]), cfg.engram_head_dim)
    assert shapes["value_proj.weight"] == (D, cfg.engram_dim) and shapes["key_proj.weight"] == (S * D, cfg.engram_dim)
    assert ("conv.weight" in shapes) == (form == "paper")
    mem, gate = EngramMemory.from_config(cfg, layer), EngramGate(cfg)
    got = {k: tuple(v.shape) for k, v in {**mem.state_dict(), **gate.state_dict()}.items()}
    assert got == shapes
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    for name, t in tensors.items():                      # tensor by tensor, as a checkpoint loader does
        owner = mem if name.startswith("embed.") else gate
        owner.get_parameter(name).data.copy_(t)
    for name, t in tensors.items():
        assert torch.equal((mem if name.startswith("embed.") else gate).get_parameter(name), t)
    full = tensor_shapes(cfg, routed_experts=False)
    assert {k[len(f"layers.{layer}.engram."):]: v for k, v in full.items()
            if k.startswith(f"layers.{layer}.engram.")} == shapes


def test_memory_lookup_is_per_head_gather(hasher):
    cfg = _cfg()
    layer = cfg.engram_layer_ids[0]
    mem = EngramMemory.from_config(cfg, layer)
    with torch.no_grad():
        mem.embed.weight.normal_()
    ids = torch.from_numpy(hasher.hash(KNOWN["cases"][1]["input_ids"])[layer].reshape(-1, 8))   # [N, O*H]
    rows = mem.lookup(ids)
    sizes, W = hasher.table_sizes(layer), mem.embed.weight
    want = []
    for j, size in enumerate(sizes):
        table = W[sum(sizes[:j]):sum(sizes[:j]) + size]
        want.append(table[ids[:, j]])
    assert rows.shape == (ids.shape[0], cfg.engram_dim)
    assert torch.equal(rows, torch.cat(want, dim=-1))
    with pytest.raises(ValueError, match="hash_ids"):
        mem.lookup(torch.tensor([[sizes[0]] + [0] * 7]))
    with pytest.raises(ValueError, match="hash_ids"):
        mem.lookup(ids[:, :3])


# ---- gate: float64 reference from the formulas ---------------------------------------------------------------------
def _random_gate(cfg: ModelConfig, seed: int) -> EngramGate:
    torch.manual_seed(seed)
    gate = EngramGate(cfg, dtype=torch.float64)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return gate


def _reference(gate_params: dict, cfg: ModelConfig, streams: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Loops over tokens and streams, numpy float64, straight from the formulas of docs/engram.md."""
    T, S, D = streams.shape
    eps = cfg.rms_norm_eps
    P = {k: v.detach().double().numpy() for k, v in gate_params.items()}

    def rms(x, w):
        return x / math.sqrt(float(np.mean(x * x)) + eps) * w

    u = np.zeros_like(streams)
    for t in range(T):
        v = P["value_proj.weight"] @ rows[t]
        keys = P["key_proj.weight"] @ rows[t]
        for s in range(S):
            score = float(rms(streams[t, s], P["query_norm.weight"]) @ rms(keys[s * D:(s + 1) * D],
                                                                            P["key_norm.weight"])) / math.sqrt(D)
            alpha = 1.0 / (1.0 + math.exp(-math.copysign(math.sqrt(abs(score)), score)))
            u[t, s] = alpha * v
    if cfg.engram_gate_form != "paper":
        return streams + u
    K, dil = cfg.engram_kernel_size, cfg.engram_max_ngram_size
    normed = np.stack([[rms(u[t, s], P["conv_norm.weight"][s]) for s in range(S)] for t in range(T)])
    w = P["conv.weight"]
    y = np.zeros_like(u)
    for t in range(T):
        for s in range(S):
            for d in range(D):
                c = s * D + d
                acc = sum(w[c, K - 1 - i] * normed[t - i * dil, s, d] for i in range(K) if t - i * dil >= 0)
                y[t, s, d] = acc / (1.0 + math.exp(-acc))   # SiLU
    return streams + u + y


def _inputs(cfg: ModelConfig, T: int, seed: int):
    g = np.random.default_rng(seed)
    streams = g.normal(size=(T, cfg.hc_mult, cfg.hidden_size)) + 0.1
    rows = g.normal(size=(T, cfg.engram_dim)) + 0.1
    return streams, rows


@pytest.mark.parametrize("form", ["v4.1", "paper"])
def test_gate_matches_float64_reference(form):
    cfg = _cfg(form)
    gate = _random_gate(cfg, seed=3)
    streams, rows = _inputs(cfg, T=13, seed=4)
    want = _reference(dict(gate.named_parameters()), cfg, streams, rows)
    assert np.abs(want - streams).min() > 0            # every entry is actually changed
    with torch.no_grad():
        out64, state = gate(torch.from_numpy(streams), torch.from_numpy(rows))
        out32, _ = gate.float()(torch.from_numpy(streams).float(), torch.from_numpy(rows).float())
    np.testing.assert_allclose(out64.numpy(), want, rtol=1e-9, atol=1e-12)      # float64: same math
    assert (state is None) == (form == "v4.1")
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.double().numpy(), want, rtol=1e-5, atol=1e-5)   # float32 rounding


@pytest.mark.parametrize("pieces", [[17], [5, 1, 1, 1, 9], [1] * 17, [2, 11, 4]])
def test_paper_conv_in_pieces_equals_whole(pieces):
    cfg = _cfg("paper")
    gate = _random_gate(cfg, seed=7)
    streams, rows = (torch.from_numpy(a) for a in _inputs(cfg, T=17, seed=8))   # 17 > look-back (K-1)*N + 1
    whole, _ = gate(streams, rows)
    outs, state, t = [], None, 0
    for n in pieces:
        out, state = gate(streams[t:t + n], rows[t:t + n], state)
        assert state.shape == (gate.conv_lookback, cfg.hc_mult, cfg.hidden_size)
        outs.append(out)
        t += n
    torch.testing.assert_close(torch.cat(outs), whole, rtol=1e-12, atol=1e-12)
    # the state matters: dropping it after the prefill changes the next tokens
    fresh, _ = gate(streams[5:], rows[5:])
    assert not torch.allclose(fresh, whole[5:])


def test_v41_ignores_conv_state():
    gate = _random_gate(_cfg("v4.1"), seed=9)
    streams, rows = (torch.from_numpy(a) for a in _inputs(_cfg(), T=6, seed=10))
    whole, state = gate(streams, rows)
    assert state is None
    first, _ = gate(streams[:4], rows[:4])
    rest, _ = gate(streams[4:], rows[4:], conv_state=torch.zeros(3))
    torch.testing.assert_close(torch.cat([first, rest]), whole, rtol=1e-12, atol=1e-12)


def test_gate_rejects_bad_shapes():
    cfg = _cfg("paper")
    gate = _random_gate(cfg, seed=0)
    streams, rows = (torch.from_numpy(a) for a in _inputs(cfg, T=4, seed=0))
    with pytest.raises(ValueError, match="streams"):
        gate(streams[:, :1], rows)
    with pytest.raises(ValueError, match="rows"):
        gate(streams, rows[:3])
    with pytest.raises(ValueError, match="conv_state"):
        gate(streams, rows, torch.zeros(2, cfg.hc_mult, cfg.hidden_size, dtype=torch.float64))
