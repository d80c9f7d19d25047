"""Checkpoint tensors (canonical names) -> model parameters.

Our parameter names are the checkpoint's, except three regular differences handled here: hyper-connection tensors are
`hc_attn_fn` in the checkpoint but `hc_attn.fn` in the module tree; Engram tables are `engram.embed.weight` in the
checkpoint but live in the block's `engram_memory`; and routed experts are stacked per layer (`ffn.experts.w1`
[E, I, D]) while the checkpoint stores one tensor per expert (`ffn.experts.{e}.w1.weight`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

_HC = re.compile(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$")
_STACKED = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(w[123])$")


def checkpoint_name(param: str) -> str:
    """Module parameter name -> canonical checkpoint name (stacked experts excluded)."""
    return _HC.sub(r"\1hc_\2_\3", param).replace(".engram_memory.", ".engram.")


def stacked_expert_names(param: str, expert_ids: list[int]) -> list[str] | None:
    """For a stacked expert parameter, the per-expert checkpoint names in stacking order; else None."""
    m = _STACKED.match(param)
    if not m:
        return None
    layer, w = m.groups()
    return [f"layers.{layer}.ffn.experts.{e}.{w}.weight" for e in expert_ids]


def required_names(model: nn.Module) -> list[str]:
    """Every checkpoint tensor the module needs."""
    names = []
    for param, expert_ids in _params(model):
        names.extend(stacked_expert_names(param, expert_ids) or [checkpoint_name(param)])
    return names


def assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the module's parameters and buffers (shapes must match exactly)."""
    state = model.state_dict()
    for param, expert_ids in _params(model):
        names = stacked_expert_names(param, expert_ids)
        src = torch.stack([tensors[n] for n in names]) if names else tensors[checkpoint_name(param)]
        dst = state[param]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{names[0] if names else checkpoint_name(param)}: shape {tuple(src.shape)}, "
                             f"model expects {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))


def _params(model: nn.Module):
    """(state-dict name, expert ids of its bank or None) for every persistent tensor."""
    banks = {name: mod.expert_ids for name, mod in model.named_modules() if hasattr(mod, "expert_ids")}
    for name in model.state_dict():
        owner = name.rsplit(".", 1)[0]
        yield name, banks.get(owner)


def load_into(path, dtype: torch.dtype = torch.float32, device="cpu", progress: bool | None = None,
              with_experts: bool = True, with_engram_tables: bool = True):
    """Build the model for the checkpoint at `path` and fill it; see `moemesh.load_model`. Without experts or Engram
    tables (an attention worker's share), those tensors are not even read."""
    from moemesh.kernels.checkpoint import Checkpoint
    from moemesh.kernels.engram import EngramHasher
    from moemesh.kernels.model import DeepseekV4

    ckpt = Checkpoint(path)
    hasher = EngramHasher.from_model_config(ckpt.config, path) if ckpt.config.has_engram else None
    model = DeepseekV4(ckpt.config, with_experts=with_experts, with_engram_tables=with_engram_tables,
                       engram_hasher=hasher)
    tensors = ckpt.read(required_names(model), dtype=torch.float32, device="cpu", progress=progress)
    assign(model, tensors)
    model = model.to(device=device)
    _cast(model, dtype)
    model.requires_grad_(False)
    model.eval()
    return model


_FP32_KEEP = ("attn_sink", "ape", "norm.weight", "hc_", "gate.bias", "tid2eid")


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype`, keeping in float32 what DeepSeek-V4 keeps in float32 (norms, mHC, sinks, ape, gate bias)."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or any(k in name for k in _FP32_KEEP) or "inv_freq" in name:
            continue
        p.data = p.data.to(dtype)
