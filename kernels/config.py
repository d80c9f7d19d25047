"""The model's configuration, read from a checkpoint's HF `config.json` (model_type `deepseek_v4`).

Field names follow the HF config (and DeepSeek's V4.1 names for Engram), so a checkpoint's config.json loads as is.
Legacy spellings that released checkpoints still ship (`compress_ratios`, `compress_rate_csa`, `num_hash_layers`,
`qk_rope_head_dim`) are folded in, as transformers does. Every error names the field and the bad value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
ATTENTION_TYPES = (SLIDING, CSA, HCA)
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
MLP_TYPES = ("hash_moe", "moe")


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


class RopeParams(BaseModel):
    """One RoPE variant: `main` (sliding layers) or `compress` (CSA/HCA layers and their compressors)."""

    model_config = ConfigDict(extra="ignore")
    rope_type: Literal["default", "yarn"] = Field("default", description="`default` or `yarn`.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base.")
    factor: float | None = Field(None, gt=0, description="YaRN context extension factor.")
    original_max_position_embeddings: int | None = Field(None, gt=0, description="YaRN: pre-training context.")
    beta_fast: float | None = Field(None, description="YaRN ramp boundary (default 32).")
    beta_slow: float | None = Field(None, description="YaRN ramp boundary (default 1).")
    attention_factor: float | None = Field(None, description="cos/sin multiplier; V4 forces 1.0 for YaRN.")
    truncate: bool = Field(True, description="YaRN: round the correction range to whole dimensions.")


class ModelConfig(BaseModel):
    """Shape and hyper-parameters of a DeepSeek-V4 model, optionally with Engram memory (V4.1 names)."""

    model_config = ConfigDict(extra="ignore", frozen=False)

    model_type: str = Field("deepseek_v4", description="Must be `deepseek_v4`.")
    vocab_size: int = Field(129280, gt=0, description="Token vocabulary size.")
    hidden_size: int = Field(4096, gt=0, description="Model width D.")
    moe_intermediate_size: int = Field(2048, gt=0, description="Width of each routed and of the shared expert.")
    num_hidden_layers: int = Field(43, gt=0, description="Number of decoder blocks.")
    num_attention_heads: int = Field(64, gt=0, description="Query heads.")
    num_key_value_heads: int = Field(1, description="Always 1: one shared K=V head.")
    head_dim: int = Field(512, gt=0, description="Per-head width (query and the shared K=V head).")
    q_lora_rank: int = Field(1024, gt=0, description="Low-rank query bottleneck.")
    num_experts_per_tok: int = Field(6, gt=0, description="Top-k routed experts per token.")
    n_routed_experts: int = Field(256, gt=0, description="Routed experts per MoE layer.")
    n_shared_experts: int = Field(1, ge=0, description="Shared experts per layer (V4: 1).")
    scoring_func: Literal["sqrtsoftplus", "sigmoid", "softmax"] = Field("sqrtsoftplus", description="Router scores.")
    norm_topk_prob: bool = Field(True, description="Normalise the chosen experts' weights to sum to 1.")
    routed_scaling_factor: float = Field(1.5, gt=0, description="Multiplier on the routed weights.")
    max_position_embeddings: int = Field(1048576, gt=0, description="Longest context.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base of sliding layers.")
    compress_rope_theta: float = Field(160000.0, gt=0, description="RoPE base of CSA/HCA layers.")
    rope_parameters: dict | None = Field(None, description="HF rope parameters: {main, compress} or flat YaRN keys.")
    partial_rotary_factor: float | None = Field(None, gt=0, le=1, description="Share of head_dim that is rotated.")
    layer_types: list[str] | None = Field(None, description="Attention type per layer.")
    compress_rates: dict[str, int] | None = Field(None, description="Compression rate per compressed layer type.")
    hc_mult: int = Field(4, gt=0, description="Hyper-connection residual streams.")
    hc_sinkhorn_iters: int = Field(20, gt=0, description="Sinkhorn iterations for the comb matrix.")
    hc_eps: float = Field(1e-6, gt=0, description="Hyper-connection numerical floor.")
    mlp_layer_types: list[str] | None = Field(None, description="`hash_moe` or `moe` per layer.")
    swiglu_limit: float = Field(10.0, gt=0, description="Clamp of the SwiGLU pre-activations.")
    sliding_window: int = Field(128, gt=1, description="Sliding window, the query included.")
    o_groups: int = Field(8, gt=0, description="Groups of the low-rank output projection.")
    o_lora_rank: int = Field(1024, gt=0, description="Per-group width of the output projection.")
    index_n_heads: int = Field(64, gt=0, description="Lightning indexer heads.")
    index_head_dim: int = Field(128, gt=0, description="Lightning indexer head width.")
    index_topk: int = Field(512, gt=0, description="Compressed entries each CSA query keeps.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    hidden_act: Literal["silu"] = Field("silu", description="Expert activation.")
    tie_word_embeddings: bool = Field(False, description="Share embedding and LM head (V4: no).")
    bos_token_id: int | None = Field(0, description="Begin-of-sequence id.")
    eos_token_id: int | list[int] | None = Field(1, description="End-of-sequence id(s).")
    pad_token_id: int | None = Field(None, description="Padding id.")
    quantization_config: dict | None = Field(None, description="FP8/FP4 weight format, as shipped.")

    # Engram (DeepSeek-V4.1 names). Absent `engram_layer_ids` means no Engram.
    engram_layer_ids: list[int] = Field(default_factory=list, description="0-indexed blocks with Engram memory.")
    engram_max_ngram_size: int = Field(3, ge=2, description="Largest N-gram order N (orders 2..N).")
    engram_n_heads: int = Field(8, gt=0, description="Hash heads per N-gram order.")
    engram_head_dim: int = Field(32, gt=0, description="Row width of each head's table.")
    engram_vocab_size: list[int] = Field(default_factory=list, description="Base table size per order 2..N.")
    engram_pad_id: int = Field(2, ge=0, description="Raw token id used before the sequence start.")
    engram_seed: int = Field(0, description="Seed of the hash multipliers.")
    engram_kernel_size: int = Field(4, ge=1, description="Paper form only: causal depthwise conv width.")
    engram_gate_form: Literal["v4.1", "paper"] = Field(
        "v4.1", description="`v4.1`: key per stream + shared value; `paper`: adds the short causal conv on the value."
    )

    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, v: str) -> str:
        if v != "deepseek_v4":
            raise ValueError(f"unknown model_type {v!r}; moemesh serves 'deepseek_v4'")
        return v

    @field_validator("num_key_value_heads")
    @classmethod
    def _one_kv_head(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"DeepSeek-V4 has one shared K=V head, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        ratios = data.pop("compress_ratios", None)
        rates = dict(data.get("compress_rates") or {CSA: 4, HCA: 128})
        if "compress_rate_csa" in data:
            rates[CSA] = data.pop("compress_rate_csa")
        if "compress_rate_hca" in data:
            rates[HCA] = data.pop("compress_rate_hca")
        data["compress_rates"] = rates
        if data.get("layer_types") is None and ratios is not None:
            bad = [r for r in ratios if r not in _RATIO_TO_TYPE]
            if bad:
                raise ValueError(f"compress_ratios: unknown ratio(s) {bad}; expected 0, 4 or 128")
            data["layer_types"] = [_RATIO_TO_TYPE[r] for r in ratios]
        n_hash = data.pop("num_hash_layers", None)
        if data.get("mlp_layer_types") is None and n_hash is not None:
            n = data.get("num_hidden_layers", 43)
            data["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        rope_dim = data.pop("qk_rope_head_dim", None)
        if data.get("partial_rotary_factor") is None and rope_dim is not None:
            data["partial_rotary_factor"] = rope_dim / data.get("head_dim", 512)
        return data

    @model_validator(mode="after")
    def _defaults_and_ranges(self) -> "ModelConfig":
        n = self.num_hidden_layers
        if self.layer_types is None:  # transformers' default: 2x HCA, then CSA/HCA interleaved
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = 64 / 512
        for name, types, allowed in (("layer_types", self.layer_types, ATTENTION_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_TYPES)):
            if len(types) != n:
                raise ValueError(f"{name}: has {len(types)} entries, num_hidden_layers is {n}")
            bad = sorted({t for t in types if t not in allowed})
            if bad:
                raise ValueError(f"{name}: unknown value(s) {bad}; allowed {list(allowed)}")
        for t in (CSA, HCA):
            rate = self.compress_rates.get(t)
            if t in self.layer_types and (rate is None or rate < 1):
                raise ValueError(f"compress_rates[{t!r}]: must be a positive int, got {rate!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} > n_routed_experts "
                             f"{self.n_routed_experts}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"o_groups: {self.o_groups} does not divide num_attention_heads*head_dim")
        if self.rope_head_dim % 2 or self.rope_head_dim > self.index_head_dim and CSA in self.layer_types:
            raise ValueError(f"partial_rotary_factor: rope dims {self.rope_head_dim} must be even and fit "
                             f"index_head_dim {self.index_head_dim}")
        if self.engram_layer_ids:
            orders = self.engram_max_ngram_size - 1
            if len(self.engram_vocab_size) != orders:
                raise ValueError(f"engram_vocab_size: needs {orders} entries (orders 2..{self.engram_max_ngram_size})"
                                 f", got {self.engram_vocab_size!r}")
            bad = [i for i in self.engram_layer_ids if not 0 <= i < n]
            if bad:
                raise ValueError(f"engram_layer_ids: {bad} out of range 0..{n - 1}")
        return self

    # ---- derived facts -------------------------------------------------------------------------------------------
    @property
    def rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def has_engram(self) -> bool:
        return bool(self.engram_layer_ids)

    @property
    def engram_dim(self) -> int:
        """Width of one token's retrieved memory: every order's every head, concatenated."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads * self.engram_head_dim

    def compress_rate(self, layer: int) -> int:
        return self.compress_rates.get(self.layer_types[layer], 0) if self.layer_types[layer] != SLIDING else 0

    def rope(self, kind: Literal["main", "compress"]) -> RopeParams:
        """RoPE parameters for sliding layers (`main`) or compressed layers (`compress`), as transformers builds them:
        YaRN applies to `compress` only, with attention_factor forced to 1."""
        rp = dict(self.rope_parameters or {})
        if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            params = dict(rp[kind])
            params.setdefault("rope_theta", self.rope_theta if kind == "main" else self.compress_rope_theta)
        elif kind == "main":
            params = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            params = {k: v for k, v in rp.items() if k not in ("main", "compress")}
            params["rope_theta"] = self.compress_rope_theta
            params.setdefault("rope_type", params.pop("type", "default"))
        params.setdefault("rope_type", "default")
        if params["rope_type"] == "yarn":
            params.setdefault("attention_factor", 1.0)
            if params.get("original_max_position_embeddings") is None:
                raise ConfigError(f"rope_parameters.{kind}.original_max_position_embeddings: required for yarn")
        try:
            return RopeParams(**params)
        except ValidationError as e:
            raise ConfigError(f"rope_parameters.{kind}: {describe_validation_error(e)}") from None

    @property
    def yarn_mscale(self) -> float:  # documented for readers: V4 does not scale cos/sin (attention_factor 1)
        return 1.0 if self.rope("compress").factor is None else 0.1 * math.log(self.rope("compress").factor) + 1.0

    # ---- I/O -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {describe_validation_error(e)}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def to_hf_dict(self) -> dict:
        """The config.json we write: HF names, plus Engram fields only when Engram is on."""
        out = self.model_dump(exclude_none=True)
        if not self.has_engram:
            out = {k: v for k, v in out.items() if not k.startswith("engram_")}
        out["architectures"] = ["DeepseekV4ForCausalLM"]
        return out


def describe_validation_error(e: ValidationError) -> str:
    """`field.path: message (got value)` for the first error: what a user needs to fix a config file."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {err['msg']}{shown}"
