"""A stand-in `torch_npu` for unit tests of our dispatch glue on machines without Ascend NPUs.

Each op computes its documented formula (op-plugin docs, torch_npu 7.x) in plain torch on the CPU and checks the
documented constraints our callers must respect, recording every call. It tests how WE call the ops (layouts,
group lists, chunking, the sink identity), not the ops themselves, which only real hardware can.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def make_module(available: bool = True, count: int = 1) -> types.ModuleType:
    """A fresh fake `torch_npu` module (ops + an `npu` namespace), with `calls` recording (op name, kwargs)."""
    mod = types.ModuleType("torch_npu")
    mod.__version__ = "0.0-fake"
    mod.calls = []
    mod.npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                    current_device=lambda: 0, get_device_name=lambda i=0: "FakeAscend",
                                    synchronize=lambda device=None: None)

    def record(name, **kw):
        mod.calls.append((name, kw))

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        record("npu_rms_norm", epsilon=epsilon)
        if gamma.dtype != x.dtype:
            raise RuntimeError("npu_rms_norm: gamma must have the dtype of x")
        rstd = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd

    def npu_grouped_matmul(x, weight, *, group_list=None, split_item=0, group_type=-1, group_list_type=0, **kw):
        record("npu_grouped_matmul", groups=len(weight), split_item=split_item, group_type=group_type,
               group_list_type=group_list_type)
        if len(weight) > 128 or len(x) != 1 or split_item not in (2, 3) or group_type != 0:
            raise RuntimeError("npu_grouped_matmul: unsupported call in this fake")
        sizes = group_list.tolist() if group_list_type == 1 else torch.diff(group_list, prepend=group_list[:1] * 0)
        a = x[0]
        if sum(sizes) != a.shape[0] or any(w.shape[0] != a.shape[1] for w in weight):
            raise RuntimeError(f"npu_grouped_matmul: group sizes {sizes} / weights do not fit x {tuple(a.shape)}")
        parts = torch.split(a, list(sizes))
        return [torch.cat([p.float() @ w.float() for p, w in zip(parts, weight)]).to(a.dtype)]

    def npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0, renorm=0,
                             norm_type=1, out_flag=False, routed_scaling_factor=1.0, eps=1e-20):
        record("npu_moe_gating_top_k", k=k, k_group=k_group, group_count=group_count, norm_type=norm_type)
        if x.dim() != 2 or bias is None or bias.dtype != x.dtype or k_group != 1 or group_count != 1 or renorm:
            raise RuntimeError("npu_moe_gating_top_k: unsupported call in this fake")
        norm = torch.sigmoid(x) if norm_type == 1 else torch.softmax(x, dim=-1)
        idx = torch.topk(norm + bias, k, dim=-1).indices
        y = norm.gather(1, idx)
        y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
        return y, idx.to(torch.int32), norm

    def npu_fused_infer_attention_score(query, key, value, *, atten_mask=None, num_heads=1, num_key_value_heads=0,
                                        scale=1.0, input_layout="BSH", sparse_mode=0, softmax_lse_flag=False, **kw):
        record("npu_fused_infer_attention_score", num_heads=num_heads, num_key_value_heads=num_key_value_heads,
               input_layout=input_layout, softmax_lse_flag=softmax_lse_flag)
        kv_heads = num_key_value_heads or num_heads
        if (input_layout != "BNSD" or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 512
                or num_heads // kv_heads > 64 or query.shape[1] != num_heads or key.shape[1] != kv_heads):
            raise RuntimeError("npu_fused_infer_attention_score: unsupported call in this fake")
        k = key.float().repeat_interleave(num_heads // kv_heads, dim=1)
        v = value.float().repeat_interleave(num_heads // kv_heads, dim=1)
        logits = scale * query.float() @ k.transpose(-1, -2)  # [B, N, Sq, Skv]
        if atten_mask is not None:
            logits = logits.masked_fill(atten_mask.bool(), float("-inf"))  # True = masked
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = (F.softmax(logits, dim=-1) @ v).to(query.dtype)
        return out, lse if softmax_lse_flag else torch.zeros(1)

    for fn in (npu_rms_norm, npu_grouped_matmul, npu_moe_gating_top_k, npu_fused_infer_attention_score):
        setattr(mod, fn.__name__, fn)
    return mod


def install_as_package(namespace: dict) -> None:
    """Body of a fake `torch_npu/__init__.py` for a subprocess: do what torch_npu's import does to torch (name the
    private backend `npu`, register `torch.npu`) and expose the fake ops."""
    fake = make_module()
    torch.utils.rename_privateuse1_backend("npu")
    torch._register_device_module("npu", fake.npu)
    namespace.update({k: v for k, v in vars(fake).items() if not k.startswith("__")}, __version__=fake.__version__)
