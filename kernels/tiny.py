"""The built-in tiny model: a few-hundred-KB DeepSeek-V4 + Engram checkpoint that exercises every path.

Four layers cover sliding, CSA and HCA attention (small compress rates, so a 200-token prompt already fills the
compressors and the indexer's top-k selects), hash routing in layer 0 and learned routing after, 16 experts top-2,
two residual streams, Engram at layers 1 and 2, YaRN on the compress rope. Weights are random but deterministic
(seeded per tensor name), stored as V4 releases store them (FP8 block-scaled attention and shared experts, FP4
routed experts) in several shards. The byte-level BPE tokenizer is trained at init time, deterministically, on the
corpus in `kernels/data/`. `moemesh init-model tiny --out DIR` calls `write_tiny_model`.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from torch import Tensor

from moemesh.kernels.checkpoint import CheckpointError, save_checkpoint
from moemesh.kernels.config import CSA, HCA, SLIDING, ModelConfig
from moemesh.kernels.weights import tensor_shapes

DATA_DIR = Path(__file__).parent / "data"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")  # ids 0, 1, 2
TOKENIZER_VOCAB = 512
SEED = 0
DTYPES = ("v4", "float32", "bfloat16")  # v4: FP8/FP4 as released; the others: every float tensor unquantized
SHARD_BYTES = {"v4": 128 * 1024, "float32": 512 * 1024, "bfloat16": 256 * 1024}  # about 8 shards each

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


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def corpus() -> list[str]:
    """The shipped training text, one line per entry, files in name order."""
    lines = []
    for path in sorted(DATA_DIR.glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on `corpus()`; <bos>, <eos>, <pad> are ids 0, 1, 2 and
    encoding prepends <bos>. Deterministic: same corpus, same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 0)])
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    bos, eos, pad = SPECIAL_TOKENS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "chat_template": ("{{ bos_token }}"
                          "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                          "{% if add_generation_prompt %}Assistant:{% endif %}"),
    }


# ---- config and weights --------------------------------------------------------------------------------------------
def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig.from_dict({**TINY_CONFIG, "vocab_size": vocab_size}, source="tiny model config")


def _init(name: str, shape: tuple, cfg: ModelConfig, g: torch.Generator) -> Tensor:
    """One tensor's deterministic initial value (float32, or int64 for tid2eid)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("tid2eid"):  # k distinct experts per token
        return torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])])
    if name.endswith("norm.weight") or leaf.endswith("scale"):
        return torch.ones(shape)
    if leaf.endswith("base") or leaf in ("attn_sink", "ape"):
        return torch.zeros(shape)
    if name.endswith("gate.bias"):
        return torch.randn(shape, generator=g) * 0.01
    if leaf.endswith("_fn"):  # hyper-connection mixes, as transformers initialises them
        return torch.randn(shape, generator=g) * 0.02
    if name in ("embed.weight", "head.weight") or ".engram.embed." in name:
        return torch.randn(shape, generator=g) * 0.1
    std = min(0.1, max(0.02, 0.5 / math.sqrt(shape[-1])))  # matrices: activations stay O(1)
    return torch.randn(shape, generator=g) * std


def _stored_dtype(name: str, dtype: str) -> torch.dtype | None:
    """bf16 for the big unquantized matrices when `dtype` is v4; fp32 for the small ones (norms, mixes, biases)."""
    if dtype != "v4":
        return getattr(torch, dtype)
    big = name in ("embed.weight", "head.weight") or name.endswith("gate.weight") or ".engram." in name
    return torch.bfloat16 if big and not name.endswith("norm.weight") else torch.float32


def init_tensors(cfg: ModelConfig, seed: int = SEED, dtype: str = "float32") -> dict[str, Tensor]:
    """Every tensor of `cfg` (canonical names, `tensor_shapes` order), each drawn from its own generator seeded by
    (seed, name), so a tensor's value does not depend on which others exist. Floats are cast to the storage dtype of
    `dtype` ("v4" keeps float32 where quantization follows)."""
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = _init(name, shape, cfg, g)
        out[name] = t.to(_stored_dtype(name, dtype)) if t.is_floating_point() else t
    return out


def write_tiny_model(out_dir: str | Path, dtype: str = "v4", *, force: bool = False,
                     max_shard_bytes: int | None = None) -> Path:
    """Write the tiny model (config.json, sharded safetensors + index, tokenizer.json, tokenizer_config.json).

    `dtype`: "v4" (FP8/FP4 as released), "float32" or "bfloat16" (unquantized). Refuses a non-empty `out_dir`
    unless `force`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: exists and is not empty (use --force to overwrite)")
    tok = train_tokenizer()
    cfg = tiny_config(tok.get_vocab_size())
    tensors = init_tensors(cfg, dtype=dtype)
    save_checkpoint(tensors, cfg, out, max_shard_bytes=max_shard_bytes or SHARD_BYTES[dtype],
                    quantize="v4" if dtype == "v4" else "none")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    return out
