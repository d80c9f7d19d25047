"""The built-in tiny model: a few-hundred-KB DeepSeek-V4 + Engram checkpoint that exercises every path.

Four layers cover sliding, CSA and HCA attention (small compress rates, so a 200-token prompt already fills the
compressors and the indexer's top-k selects), hash routing in layer 0 and learned routing after, 16 experts top-2,
two residual streams, Engram at layers 1 and 2, YaRN on the compress rope. Weights are random but deterministic
(seeded per tensor name), stored as V4 releases store them (FP8 block-scaled attention and shared experts, FP4
routed experts) in several shards. The byte-level BPE tokenizer is trained at init time, deterministically, on the
corpus in `kernels/data/`. `moemesh init-model tiny --out DIR` writes it through the registry (kernels/builtin.py);
`write_tiny_model` is the same from Python.
"""

from __future__ import annotations

from pathlib import Path

from moemesh.kernels.config import CSA, HCA, SLIDING, ModelConfig
from moemesh.kernels.synthetic import DTYPES, TOKENIZER_VOCAB, BuiltinModel, init_tensors, write_model

__all__ = ["DTYPES", "TINY", "TINY_CONFIG", "init_tensors", "tiny_config", "write_tiny_model"]

TINY_CONFIG = {
    "model_type": "deepseek_v4",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": [SLIDING, CSA, HCA, CSA],
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
    "compress_rates": {CSA: 4, HCA: 8},
    "sliding_window": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,  # 16 rope dims
    "q_lora_rank": 48,
    "o_groups": 2,
    "o_lora_rank": 32,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 8,  # a 200-token prompt has 50 CSA entries
    "n_routed_experts": 16,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "hc_mult": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                        "beta_fast": 32.0, "beta_slow": 1.0},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "engram_layer_ids": [1, 2],
    "engram_max_ngram_size": 3,
    "engram_n_heads": 2,
    "engram_head_dim": 16,
    "engram_vocab_size": [1024, 1024],
    "engram_pad_id": 2,
    "engram_seed": 0,
}

TINY = BuiltinModel("tiny", TINY_CONFIG, shard_bytes={"v4": 128 * 1024, "float32": 512 * 1024,
                                                      "bfloat16": 256 * 1024},  # about 8 shards each
                    summary="4 layers, 16 experts top-2, Engram at 2 layers; ~1 MB (v4): tests and first steps")


def tiny_config(vocab_size: int = TOKENIZER_VOCAB) -> ModelConfig:
    return TINY.model_config(vocab_size)


def write_tiny_model(out_dir: str | Path, dtype: str = "v4", *, force: bool = False,
                     max_shard_bytes: int | None = None) -> Path:
    """`synthetic.write_model` of the tiny model."""
    return write_model(TINY, out_dir, dtype, force=force, max_shard_bytes=max_shard_bytes)
