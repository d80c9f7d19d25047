"""Built-in models with DeepSeek-V4-Flash's structure, scaled down in width only: `v4-flash-mini`, `v4.1-flash-mini`.

Everything that shapes expert traffic and the step's control flow is V4-Flash's: the layer pattern, expert count,
top-k, hash-routed layers, residual streams, compression rates, index top-k, sliding window, head counts. Widths are
V4-Flash's divided by 16, so the models hold about 1 B parameters (0.5-1.5 B) and a monolithic plus a served copy fit
in 24 GiB (float32 in memory: ~4.5 GB each). Where each number comes from:

| field | V4-Flash | here | source |
|---|---|---|---|
| num_hidden_layers, layer_types | 43: `[S, S] + [CSA, HCA] x 20 + [CSA]` | same | ARCHITECTURE.md section 2 ("V4-Flash layer pattern"; released config's `compress_ratios` 0/4/128) |
| mlp_layer_types | 3 x `hash_moe`, then `moe` | same | transformers `DeepseekV4Config.default_num_hash_layers` = 3; ARCHITECTURE.md ("first 3 layers route by a frozen token->experts table") |
| n_routed_experts, n_shared_experts, num_experts_per_tok | 256, 1, 6 | same | ARCHITECTURE.md table; transformers defaults |
| scoring_func, routed_scaling_factor, norm_topk_prob, swiglu_limit | sqrtsoftplus, 1.5, true, 10 | same | ARCHITECTURE.md ("MoE"); transformers defaults |
| hc_mult, hc_sinkhorn_iters, hc_eps | 4, 20, 1e-6 | same | ARCHITECTURE.md ("mHC"); transformers defaults |
| compress_rates | CSA 4, HCA 128 | same | ARCHITECTURE.md ("Hybrid attention"); transformers `default_compress_rates` |
| sliding_window, index_topk | 128, 512 | same | ARCHITECTURE.md; transformers defaults |
| num_attention_heads, num_key_value_heads, o_groups, index_n_heads | 64, 1, 8, 64 | same (counts, not widths) | ARCHITECTURE.md table; transformers defaults |
| partial_rotary_factor | 64 / 512 (rope on 64 dims) | same: rope on 4 of 32 dims | transformers `default_partial_rotary_factor` |
| hidden_size | 4096 | 256 (/16) | ARCHITECTURE.md table |
| moe_intermediate_size (expert width) | 2048 | 128 (/16); v4.1: 96 (see below) | ARCHITECTURE.md table |
| head_dim, q_lora_rank, o_lora_rank, index_head_dim | 512, 1024, 1024, 128 | 32, 64, 64, 8 (/16) | transformers defaults |
| rope_theta, compress_rope_theta | 1e4, 1.6e5 | same | transformers defaults |
| compress rope: YaRN factor 16 | factor 16, attention_factor 1 | same; original 65536 (= 1M / 16), beta 32 / 1 | transformers config comment ("yarn factor=16"); original context and betas assumed (YaRN defaults) |
| max_position_embeddings | 1048576 | same | ARCHITECTURE.md ("1M tokens"); transformers default |
| vocab | 129280 | 512 | not a width: the built-in byte-level BPE (kernels/synthetic.py), shared with `tiny` |

`v4.1-flash-mini` is the same with the changes the V4.1 facts call for: 40 layers (the same rule, 2 sliding then CSA
and HCA alternating, which at 40 ends with HCA; V4.1's own `layer_types` are not in our sources), 384 routed experts
top-6, Engram at layers 1 and 14 (ARCHITECTURE.md section 2) with N-grams 2..3, 8 heads of 32 per order (the config
defaults, the layout the planner's V4-Pro+Engram preset assumes). Its expert width is 96, not 128: at 128 the 40 x 384
experts alone would be 1.51 B parameters, over the 1.5 B bound. Its Engram tables are sized (base 1,310,720 rows per
order and head, primes above it) so they hold more than the rest of the model, as V4.1's (~196 B parameters) are
several times its dense weights: 2 layers x 2 orders x 8 heads x ~1.31 M rows x 32 = ~1.34 B parameters, 2.5 GiB in
bf16 (how `v4` stores Engram tables), one safetensors tensor per layer that the Engram service reads by row ranges
into its memory-mapped table files (actors/engram/service.py). Parameter counts: `synthetic.param_count`.
"""

from __future__ import annotations

from moemesh.kernels.config import CSA, HCA, SLIDING
from moemesh.kernels.synthetic import BuiltinModel

_MIB = 1 << 20


def v4_layer_types(n_layers: int) -> list[str]:
    """V4-Flash's pattern for `n_layers`: two sliding-window layers, then CSA and HCA alternating (43 -> final CSA)."""
    return [SLIDING] * 2 + [CSA if i % 2 == 0 else HCA for i in range(n_layers - 2)]


def _v4_flash_like(n_layers: int, experts: int, expert_width: int) -> dict:
    return {
        "model_type": "deepseek_v4",
        "num_hidden_layers": n_layers,
        "layer_types": v4_layer_types(n_layers),
        "mlp_layer_types": ["hash_moe"] * 3 + ["moe"] * (n_layers - 3),
        "hidden_size": 256,
        "moe_intermediate_size": expert_width,
        "n_routed_experts": experts,
        "num_experts_per_tok": 6,
        "n_shared_experts": 1,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "compress_rates": {CSA: 4, HCA: 128},
        "sliding_window": 128,
        "index_topk": 512,
        "num_attention_heads": 64,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "partial_rotary_factor": 64 / 512,
        "q_lora_rank": 64,
        "o_groups": 8,
        "o_lora_rank": 64,
        "index_n_heads": 64,
        "index_head_dim": 8,
        "max_position_embeddings": 1048576,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                            "beta_fast": 32.0, "beta_slow": 1.0},
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }


V4_FLASH_MINI = BuiltinModel(
    "v4-flash-mini", _v4_flash_like(43, experts=256, expert_width=128),
    shard_bytes={"v4": 256 * _MIB, "float32": 1024 * _MIB, "bfloat16": 512 * _MIB},
    summary="V4-Flash's structure (43 layers, 256 experts top-6, hc 4) at 1/16 width; ~1.1 B params")

V41_FLASH_MINI = BuiltinModel(
    "v4.1-flash-mini", {
        **_v4_flash_like(40, experts=384, expert_width=96),
        "engram_layer_ids": [1, 14],
        "engram_max_ngram_size": 3,
        "engram_n_heads": 8,
        "engram_head_dim": 32,
        "engram_vocab_size": [1_310_720, 1_310_720],
        "engram_pad_id": 2,
        "engram_seed": 0,
    },
    shard_bytes={"v4": 256 * _MIB, "float32": 1024 * _MIB, "bfloat16": 512 * _MIB},
    summary="40 layers, 384 experts top-6, Engram at layers 1 and 14 (2.5 GiB of tables); ~1.2 B params + tables")
