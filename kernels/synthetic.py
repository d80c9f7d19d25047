"""Writing a built-in model: a `BuiltinModel` (its config and shard size) -> a checkpoint directory like a release's.

One writer serves every built-in model (kernels/tiny.py, kernels/v4_mini.py; the registry is kernels/builtin.py).
Weights are random but deterministic: each tensor is drawn from its own generator seeded by (seed, tensor name), so a
tensor's value does not depend on which others exist; a big tensor is drawn row-chunk by row-chunk from that one
generator, so it never exists in float32 whole. Tensors are produced and written one shard at a time (the writer holds
at most one shard, or one tensor bigger than a shard), which keeps a 1 B-parameter model's write memory-light. Stored
as V4 releases store them by default (FP8 block-scaled attention and shared experts, FP4 routed experts). The
byte-level BPE tokenizer is trained at write time, deterministically, on the corpus in `kernels/data/`.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moemesh.kernels.chat_format import CHAT_TEMPLATE, ROLE_TOKENS, TOOL_TOKENS
from moemesh.kernels.checkpoint import CheckpointError, save_checkpoint
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.weights import tensor_shapes

DATA_DIR = Path(__file__).parent / "data"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")  # ids 0, 1, 2
TOKENIZER_VOCAB = 512  # in all: trained tokens, then the chat format's
SEED = 0
DTYPES = ("v4", "float32", "bfloat16")  # v4: FP8/FP4 as released; the others: every float tensor unquantized
_CHUNK_ELEMENTS = 1 << 24  # a tensor larger than this is drawn in row chunks of about this many elements


@dataclass(frozen=True)
class BuiltinModel:
    """A model `moemesh init-model NAME` writes: HF config fields (vocab_size comes from the tokenizer) and the
    largest shard per storage dtype."""

    name: str
    config: dict
    shard_bytes: dict[str, int]
    summary: str = field(default="", compare=False)

    def model_config(self, vocab_size: int = TOKENIZER_VOCAB) -> ModelConfig:
        return ModelConfig.from_dict({**self.config, "vocab_size": vocab_size}, source=f"{self.name} model config")


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def corpus() -> list[str]:
    """The shipped training text, one line per entry, files in name order."""
    lines = []
    for path in sorted(DATA_DIR.glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on `corpus()`; <bos>, <eos>, <pad> are ids 0, 1, 2 and
    encoding prepends <bos>. The chat format's tokens (kernels/chat_format.py) are the last ones of `vocab_size`:
    role markers as special tokens, tool-call markup as added tokens that decode to their text. Deterministic: same
    corpus, same tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trained = vocab_size - len(ROLE_TOKENS) - len(TOOL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=trained, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 0)])
    tok.add_special_tokens(list(ROLE_TOKENS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tok


def tokenizer_config(max_length: int) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    bos, eos, pad = SPECIAL_TOKENS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


# ---- weights -------------------------------------------------------------------------------------------------------
def _std(name: str, shape: tuple) -> float:
    """The std a random float tensor is drawn with."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("gate.bias"):
        return 0.01
    if leaf.endswith("_fn"):  # hyper-connection mixes, as transformers initialises them
        return 0.02
    if name in ("embed.weight", "head.weight") or ".engram.embed." in name:
        return 0.1
    return min(0.1, max(0.02, 0.5 / math.sqrt(shape[-1])))  # matrices: activations stay O(1)


def _draw(name: str, shape: tuple, cfg: ModelConfig, g: torch.Generator, out_dtype: torch.dtype) -> Tensor:
    """One tensor's deterministic value, stored as `out_dtype` (int64 for tid2eid)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("tid2eid"):  # k distinct experts per token
        return torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])])
    if name.endswith("norm.weight") or leaf.endswith("scale"):
        return torch.ones(shape, dtype=out_dtype)
    if leaf.endswith("base") or leaf in ("attn_sink", "ape"):
        return torch.zeros(shape, dtype=out_dtype)
    std = _std(name, shape)
    if math.prod(shape) <= _CHUNK_ELEMENTS:
        return (torch.randn(shape, generator=g) * std).to(out_dtype)
    out = torch.empty(shape, dtype=out_dtype)  # row chunks, one generator: never the whole tensor in float32
    step = max(1, _CHUNK_ELEMENTS // math.prod(shape[1:]))
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        out[a:b] = torch.randn((b - a, *shape[1:]), generator=g) * std
    return out


def _stored_dtype(name: str, dtype: str) -> torch.dtype:
    """bf16 for the big unquantized matrices when `dtype` is v4 (float32 where quantization follows, and for the
    small tensors: norms, mixes, biases); else `dtype` for every float tensor."""
    if dtype != "v4":
        return getattr(torch, dtype)
    big = name in ("embed.weight", "head.weight") or name.endswith("gate.weight") or ".engram." in name
    return torch.bfloat16 if big and not name.endswith("norm.weight") else torch.float32


def iter_tensors(cfg: ModelConfig, seed: int = SEED, dtype: str = "float32") -> Iterator[tuple[str, Tensor]]:
    """Every tensor of `cfg` as (canonical name, value), lazily, in `tensor_shapes` order. Floats come in the storage
    dtype of `dtype` ("v4" keeps float32 where quantization follows)."""
    for name, shape in tensor_shapes(cfg).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield name, _draw(name, shape, cfg, g, _stored_dtype(name, dtype))


def init_tensors(cfg: ModelConfig, seed: int = SEED, dtype: str = "float32") -> dict[str, Tensor]:
    """`iter_tensors` as a dict (for small models and tests)."""
    return dict(iter_tensors(cfg, seed, dtype))


def param_count(cfg: ModelConfig, *, engram_tables: bool = True) -> int:
    """Parameters of `cfg` (tid2eid, an index table, not counted); Engram tables optionally left out."""
    shapes = tensor_shapes(cfg, engram_tables=engram_tables)
    return sum(math.prod(s) for n, s in shapes.items() if not n.endswith("tid2eid"))


# ---- writing -------------------------------------------------------------------------------------------------------
def write_model(model: BuiltinModel, out_dir: str | Path, dtype: str = "v4", *, force: bool = False,
                max_shard_bytes: int | None = None) -> Path:
    """Write `model` (config.json, safetensors shards + index, tokenizer.json, tokenizer_config.json) to `out_dir`.

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
    cfg = model.model_config(tok.get_vocab_size())
    save_checkpoint(iter_tensors(cfg, dtype=dtype), cfg, out, max_shard_bytes=max_shard_bytes or
                    model.shard_bytes[dtype], quantize="v4" if dtype == "v4" else "none")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg.max_position_embeddings),
                                                          indent=2) + "\n")
    return out
