"""The model as the planner sees it: how many experts, how big, how much traffic per token (`ModelShape`).

Built from a checkpoint's `ModelConfig` (`ModelShape.from_config`) or from a named preset (`v4-flash`, `v4-pro`,
`v4-pro+engram`) carrying the numbers of the architecture notes (DeepSeek's V4-Flash release config and V4-Pro model
card). `resolve_model` takes either.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

FP4_EXPERT_BYTES_PER_PARAM = 0.5 + 1 / 32   # e2m1 nibble + one ue8m0 scale byte per 32 weights (V4 routed experts)
FP8_BYTES_PER_PARAM = 1.0                    # e4m3 (+ 1 scale per 128x128 block, negligible)


class ModelShape(BaseModel):
    """Everything the planner needs to know about the model. Bytes are as stored on the device."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="Model name, for reports.")
    layers: int = Field(gt=0, description="MoE layers (every DeepSeek-V4 layer is MoE).")
    experts: int = Field(gt=0, description="Routed experts per layer.")
    top_k: int = Field(gt=0, description="Routed experts per token.")
    hidden: int = Field(gt=0, description="Model width D: one token's activation is D elements on the wire.")
    expert_width: int = Field(gt=0, description="Intermediate width of one routed expert (SwiGLU).")
    expert_bytes: float = Field(gt=0, description="Bytes of one routed expert's weights (w1, w2, w3 with scales).")
    dense_bytes: float = Field(ge=0, description="Bytes an attention rank holds: attention, shared expert, router, "
                               "embeddings, head (everything but routed experts and Engram tables).")
    kv_bytes_per_token: float = Field(ge=0, description="KV-cache bytes per cached token over all layers "
                                      "(compressed CSA/HCA entries).")
    kv_bytes_per_sequence: float = Field(0, ge=0, description="KV-cache bytes per sequence independent of length "
                                         "(the sliding windows).")
    engram_table_bytes: float = Field(0, ge=0, description="Bytes of all Engram tables (0: no Engram).")
    engram_row_bytes: float = Field(0, ge=0, description="Engram bytes fetched per token (all Engram layers).")
    dispatch_bytes: float = Field(1.0, gt=0, description="Bytes per hidden element sent to an expert "
                                  "(1: FP8 dispatch, as DeepEP does).")
    combine_bytes: float = Field(2.0, gt=0, description="Bytes per hidden element sent back (2: BF16 combine).")

    @model_validator(mode="after")
    def _top_k_fits(self) -> "ModelShape":
        if self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} > experts {self.experts}")
        return self

    @property
    def expert_flops_per_token(self) -> float:
        """FLOPs of one token through one routed expert: three D x I matmuls, 2 FLOPs per multiply-add."""
        return 6.0 * self.hidden * self.expert_width

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_width

    @property
    def all_experts_bytes(self) -> float:
        """One copy of every routed expert of every layer."""
        return self.layers * self.experts * self.expert_bytes

    @classmethod
    def from_config(cls, cfg, name: str = "checkpoint") -> "ModelShape":
        """From a `moemesh.kernels.config.ModelConfig`. Routed experts count as FP4 and the rest as FP8 when the
        config carries a V4 `quantization_config`, else as BF16."""
        from moemesh.kernels.config import CSA, HCA
        from moemesh.kernels.weights import tensor_shapes

        quant = cfg.quantization_config or {}
        expert_rate = FP4_EXPERT_BYTES_PER_PARAM if quant.get("expert_dtype") == "fp4" else (1.0 if quant else 2.0)
        dense_rate = FP8_BYTES_PER_PARAM if quant else 2.0
        dense_params = sum(map(math.prod, tensor_shapes(cfg, routed_experts=False, engram_tables=False).values()))
        kv_elem = 2.0      # the KV cache is kept in BF16
        per_token = sum((cfg.head_dim + cfg.index_head_dim) / cfg.compress_rate(i) if t == CSA else
                        cfg.head_dim / cfg.compress_rate(i) if t == HCA else 0.0
                        for i, t in enumerate(cfg.layer_types)) * kv_elem
        per_seq = cfg.num_hidden_layers * (cfg.sliding_window - 1) * cfg.head_dim * kv_elem
        # Engram: one table per (layer, order, head), about `engram_vocab_size[order]` rows of `engram_head_dim`.
        engram_rows = sum(cfg.engram_vocab_size) * cfg.engram_n_heads
        engram_table = len(cfg.engram_layer_ids) * engram_rows * cfg.engram_head_dim * dense_rate
        return cls(name=name, layers=cfg.num_hidden_layers, experts=cfg.n_routed_experts,
                   top_k=cfg.num_experts_per_tok, hidden=cfg.hidden_size, expert_width=cfg.moe_intermediate_size,
                   expert_bytes=3 * cfg.hidden_size * cfg.moe_intermediate_size * expert_rate,
                   dense_bytes=dense_params * dense_rate, kv_bytes_per_token=per_token,
                   kv_bytes_per_sequence=per_seq, engram_table_bytes=engram_table,
                   engram_row_bytes=len(cfg.engram_layer_ids) * cfg.engram_dim * dense_rate if cfg.has_engram else 0)


def _v4_preset(name: str, *, layers: int, hidden: int, experts: int, width: int, active_params: float) -> ModelShape:
    """A DeepSeek-V4 shape from ARCHITECTURE.md section 2. Routed experts FP4, the rest FP8. What an attention rank
    holds is the active parameters minus the top-6 routed experts. KV: layers [sliding, sliding] + [CSA, HCA]...,
    head_dim 512 (+128 indexer keys on CSA), 4:1 and 128:1 compression, BF16 (V4-Pro's layer pattern is assumed
    to follow V4-Flash's)."""
    expert_params = 3 * hidden * width
    n_csa = (layers - 2 + 1) // 2
    n_hca = (layers - 2) // 2
    return ModelShape(
        name=name, layers=layers, experts=experts, top_k=6, hidden=hidden, expert_width=width,
        expert_bytes=expert_params * FP4_EXPERT_BYTES_PER_PARAM,
        dense_bytes=(active_params - 6 * layers * expert_params) * FP8_BYTES_PER_PARAM,
        kv_bytes_per_token=(n_csa * (512 + 128) / 4 + n_hca * 512 / 128) * 2.0,
        kv_bytes_per_sequence=layers * 127 * 512 * 2.0)


PRESETS: dict[str, ModelShape] = {
    "v4-flash": _v4_preset("V4-Flash", layers=43, hidden=4096, experts=256, width=2048, active_params=13e9),
    "v4-pro": _v4_preset("V4-Pro", layers=61, hidden=7168, experts=384, width=3072, active_params=49e9),
}
# V4-Pro plus DeepSeek-V4.1's Engram tables: ~196B parameters in FP8 over 2 layers (ARCHITECTURE.md section 2);
# a token fetches 2 layers x (2 orders x 8 heads x 32) FP8 values (the V4.1 layout is assumed to match the config
# defaults).
PRESETS["v4-pro+engram"] = PRESETS["v4-pro"].model_copy(update={
    "name": "V4-Pro+Engram", "engram_table_bytes": 196e9, "engram_row_bytes": 2 * 2 * 8 * 32 * 1.0})


def resolve_model(spec: str | Path) -> ModelShape:
    """A preset name (`v4-flash`, `v4-pro`, `v4-pro+engram`) or a checkpoint directory / config.json path."""
    key = str(spec).lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"model: {str(spec)!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint path")
    from moemesh.kernels.config import ModelConfig

    cfg = ModelConfig.from_file(path)
    return ModelShape.from_config(cfg, name=(path if path.is_dir() else path.parent).name)
