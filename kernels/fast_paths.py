"""Device fast paths, chosen per call by where the tensors live (`device.kernel_path`; `_path` below).

Every function returns the result, or None meaning "run the reference": on the CPU, with MOEMESH_KERNELS=reference,
and for a dtype or shape the device kernel does not take. Callers keep their plain-torch code as that fallback, so
CPU numerics never change and the reference stays the oracle. A path's module is imported on first use: triton only
for CUDA tensors, torch_npu only for NPU tensors.

| op              | cuda (Triton)                          | npu (torch_npu)                     |
|-----------------|----------------------------------------|-------------------------------------|
| rms_norm        | triton_norm                            | npu_rms_norm                        |
| routed_experts  | triton_moe grouped SwiGLU (+FP8/FP4)   | npu_grouped_matmul                  |
| gating_topk     | reference                              | npu_moe_gating_top_k (sigmoid/softmax scoring only) |
| sink_attention  | triton_attention (sparse gather)       | npu_fused_infer_attention_score + sink via lse |
| engram_lookup   | triton_engram row gather               | reference                           |
| engram_gate     | triton_engram fused gate               | reference                           |

An NPU operator that raises (a constraint its documentation did not state for this SoC) is logged once and not
tried again in this process; the reference runs instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from moemesh.kernels.device import DeviceUnavailable, KernelPath, kernel_path

log = logging.getLogger(__name__)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NPU_REFUSED: set[str] = set()  # NPU ops that raised once in this process


def _path(t: Tensor) -> KernelPath:
    """`device.kernel_path` of t's device. CPU tensors (every call of a CPU role) decline here at once: `is_cpu` is
    several times cheaper than building `t.device`, and the mode is not read. Tests patch this to force a path."""
    return "reference" if t.is_cpu else kernel_path(t.device)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """(weight * x / rms(x)).to(x.dtype) over the last axis, as `norms.RMSNorm`."""
    path = _path(x)
    if path == "triton" and x.dtype in _TRITON_DTYPES:
        from moemesh.kernels import triton_norm

        with _on(x.device):
            return triton_norm.rms_norm(x, weight, eps)
    if path == "torch_npu":
        from moemesh.kernels import npu_ops

        return _npu("npu_rms_norm", npu_ops.rms_norm, x, weight, eps)
    return None


def routed_experts(bank, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor | None:
    """`moe.ExpertBank.forward`: x [N, D], indices [N, k] global ids (-1 = none), weights [N, k] -> [N, D].

    (token, slot) pairs are sorted by the expert holding them (pairs for experts not held here go last and are
    skipped); the grouped kernels run over the sorted rows; results are put back per pair and summed over k in
    float32, in a fixed order (deterministic, no atomics)."""
    path = _path(x)
    if path == "reference" or x.dtype not in _TRITON_DTYPES or (path == "torch_npu" and bank.is_packed):
        return None  # the NPU op takes float weights: a packed bank decodes per expert in the reference
    N, k = indices.shape
    if N == 0:
        return torch.zeros_like(x)
    e = len(bank.expert_ids)
    slots = bank.slot_of[indices.reshape(-1)]
    key = torch.where(slots >= 0, slots, torch.full_like(slots, e))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=e + 1)[:e]
    tok = (order // k).to(torch.int32)
    row_weight = weights.reshape(-1)[order].float()
    x = x if x.stride(-1) == 1 else x.contiguous()
    if path == "triton":
        with _on(x.device):
            y = _triton_experts(bank, x, tok, counts, row_weight)
    else:
        y = _npu_experts(bank, x, tok, counts, row_weight)
    if y is None:
        return None
    per_pair = torch.empty_like(y)
    per_pair[order] = y
    return per_pair.view(N, k, -1).sum(1).to(x.dtype)


def _triton_experts(bank, x: Tensor, tok: Tensor, counts: Tensor, row_weight: Tensor) -> Tensor:
    from moemesh.kernels import triton_moe
    from moemesh.kernels.packed import PackedExperts

    w = bank.packed or PackedExperts.from_bank(bank, "float")  # "float": the bank's own tensors, no copy
    h = triton_moe.swiglu_up(x, tok, counts, w.w1, w.w3, bank.limit)  # [N*k, I]
    return triton_moe.grouped_mm(h, counts, w.w2, row_weight)  # [N*k, D] float32, zeros past the held pairs


def _npu_experts(bank, x: Tensor, tok: Tensor, counts: Tensor, row_weight: Tensor) -> Tensor | None:
    from moemesh.kernels import npu_ops

    counts_host = counts.tolist()  # the op takes group sizes; one host sync per call
    y = _npu("npu_grouped_matmul", npu_ops.grouped_swiglu, x, tok, counts_host, bank.w1, bank.w3, bank.w2,
             bank.limit, row_weight)
    if y is None:
        return None
    full = torch.zeros(tok.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    full[: y.shape[0]] = y
    return full


def gating_topk(logits: Tensor, bias: Tensor, k: int, scoring: str, normalize: bool, scale: float
                ) -> tuple[Tensor, Tensor] | None:
    """`moe.Router` for learned layers: logits [N, E] -> (weights [N, k] float32, indices [N, k] int64)."""
    if _path(logits) != "torch_npu":
        return None
    from moemesh.kernels import npu_ops

    return _npu("npu_moe_gating_top_k", npu_ops.gating_topk, logits, bias, k, scoring, normalize, scale)


def sink_attention(q: Tensor, keys: Tensor, allowed: Tensor, sink: Tensor, scale: float,
                   key_lists: Callable[[], Tensor] | None = None) -> Tensor | None:
    """`attention.sink_attention`: q [T, H, Dh], keys [S, Dh] (= values), allowed bool [T, S], sink [H]
    -> [T, H, Dh].

    `key_lists`, when the caller can build them without a host sync: a callable returning int [T, L], each query's
    allowed rows of `keys` (-1 = unused slot; exactly the True entries of `allowed`). Called only by the Triton path,
    which gathers keys by index; without it, the lists come from `allowed` at one host sync per call."""
    path = _path(q)
    if path == "triton" and q.dtype in _TRITON_DTYPES:
        from moemesh.kernels import triton_attention

        idx = key_lists() if key_lists is not None else triton_attention.mask_to_indices(allowed)
        with _on(q.device):
            return triton_attention.sparse_sink_attention(q, keys.to(q.dtype), idx, sink, scale)
    if path == "torch_npu":
        from moemesh.kernels import npu_ops

        return _npu("npu_fused_infer_attention_score", npu_ops.sink_attention, q, keys, allowed, sink, scale)
    return None


def engram_lookup(hash_ids: Tensor, offsets: Tensor, table: Tensor) -> Tensor | None:
    """`engram.EngramMemory.lookup` after its bounds check: ids [N, J], offsets [J], table [R, hd] -> [N, J*hd]."""
    if _path(table) != "triton" or hash_ids.dim() != 2:
        return None
    from moemesh.kernels import triton_engram

    with _on(table.device):
        return triton_engram.gather_rows(hash_ids, offsets, table)


def engram_gate(streams: Tensor, keys: Tensor, value: Tensor, query_norm: Tensor, key_norm: Tensor,
                eps: float) -> Tensor | None:
    """`engram.EngramGate` (v4.1 form) after its projections: streams/keys [T, S, D], value [T, D] -> [T, S, D]."""
    if _path(streams) != "triton" or streams.dtype not in _TRITON_DTYPES:
        return None
    from moemesh.kernels import triton_engram

    with _on(streams.device):
        return triton_engram.engram_gate(streams, keys, value, query_norm, key_norm, eps)


def _on(dev: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (a process may see several GPUs)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _npu(op: str, fn, *args):
    if op in _NPU_REFUSED:
        return None
    try:
        return fn(*args)
    except DeviceUnavailable:
        raise
    except RuntimeError as e:
        _NPU_REFUSED.add(op)
        log.warning("%s refused this call (%s); using the torch reference for it from now on in this process", op, e)
        return None
