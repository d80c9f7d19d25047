"""Tensor names and shapes of a DeepSeek-V4 checkpoint.

Canonical names are DeepSeek's release names without a prefix (`embed.weight`, `layers.3.attn.wq_a.weight`,
`layers.3.ffn.experts.7.w1.weight`, `hc_head_fn`). `canonical_name` also accepts what transformers' `save_pretrained`
writes (`model.` prefix, `model.embed_tokens.weight`, `model.hc_head.hc_fn`, `lm_head.weight`), so both load.
Quantized weights carry a companion scale tensor (`<name>.scale` or `<name>.weight_scale_inv`), see quant.py.
"""

from __future__ import annotations

import re

from moemesh.kernels.config import CSA, SLIDING, ModelConfig

_ALIASES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.")
_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")


def canonical_name(raw: str) -> str:
    name = raw[len("model."):] if raw.startswith("model.") else raw
    return _ALIASES.get(name, name)


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) for a routed-expert tensor (weight or scale), else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def scale_names(weight_name: str) -> list[str]:
    """Possible companion scale names of a quantized `<prefix>.weight`."""
    prefix = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    return [prefix + s for s in _SCALE_SUFFIXES]


def expert_tensor_names(layer: int, expert: int) -> list[str]:
    return [f"layers.{layer}.ffn.experts.{expert}.{w}.weight" for w in ("w1", "w2", "w3")]


def tensor_shapes(cfg: ModelConfig, *, routed_experts: bool = True, engram_tables: bool = True) -> dict[str, tuple]:
    """Every tensor of the model in its float (dequantized) shape, by canonical name.

    `routed_experts=False` leaves out the routed experts (what an attention worker holds); `engram_tables=False`
    leaves out the Engram embedding tables (held by the Engram service)."""
    D, V, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    H, hd, ql = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    mix = (2 + hc) * hc
    shapes: dict[str, tuple] = {
        "embed.weight": (V, D),
        "norm.weight": (D,),
        "head.weight": (V, D),
        "hc_head_fn": (hc, hc * D),
        "hc_head_base": (hc,),
        "hc_head_scale": (1,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (D,),
            p + "ffn_norm.weight": (D,),
            p + "attn.wq_a.weight": (ql, D),
            p + "attn.q_norm.weight": (ql,),
            p + "attn.wq_b.weight": (H * hd, ql),
            p + "attn.wkv.weight": (hd, D),
            p + "attn.norm.weight": (hd,),
            p + "attn.wo_a.weight": (cfg.o_groups * cfg.o_lora_rank, H * hd // cfg.o_groups),
            p + "attn.wo_b.weight": (D, cfg.o_groups * cfg.o_lora_rank),
            p + "attn.attn_sink": (H,),
            p + "ffn.gate.weight": (E, D),
            p + "ffn.shared_experts.w1.weight": (I, D),
            p + "ffn.shared_experts.w2.weight": (D, I),
            p + "ffn.shared_experts.w3.weight": (I, D),
        })
        for part in ("attn", "ffn"):
            shapes.update({p + f"hc_{part}_fn": (mix, hc * D), p + f"hc_{part}_base": (mix,),
                           p + f"hc_{part}_scale": (3,)})
        kind = cfg.layer_types[i]
        if kind != SLIDING:
            rate, width = cfg.compress_rate(i), (2 if kind == CSA else 1) * hd
            shapes.update(_compressor_shapes(p + "attn.compressor.", D, rate, width, hd))
        if kind == CSA:
            ihd, ih = cfg.index_head_dim, cfg.index_n_heads
            shapes.update(_compressor_shapes(p + "attn.indexer.compressor.", D, cfg.compress_rate(i), 2 * ihd, ihd))
            shapes[p + "attn.indexer.wq_b.weight"] = (ih * ihd, ql)
            shapes[p + "attn.indexer.weights_proj.weight"] = (ih, D)
        if cfg.mlp_layer_types[i] == "hash_moe":
            shapes[p + "ffn.gate.tid2eid"] = (V, cfg.num_experts_per_tok)
        else:
            shapes[p + "ffn.gate.bias"] = (E,)
        if routed_experts:
            for e in range(E):
                w1, w2, w3 = expert_tensor_names(i, e)
                shapes.update({w1: (I, D), w2: (D, I), w3: (I, D)})
        if i in cfg.engram_layer_ids:
            from moemesh.kernels.engram import engram_param_shapes

            for suffix, shape in engram_param_shapes(cfg, i).items():
                if engram_tables or not suffix.startswith("embed."):
                    shapes[p + "engram." + suffix] = shape
    return shapes


def _compressor_shapes(p: str, D: int, rate: int, width: int, out: int) -> dict[str, tuple]:
    return {p + "wkv.weight": (width, D), p + "wgate.weight": (width, D), p + "ape": (rate, width),
            p + "norm.weight": (out,)}
