"""A checkpoint against transformers' `DeepseekV4ForCausalLM` (float32): prefill, then cached decode, logits compared.

transformers loads the same float32 checkpoint (`from_pretrained` maps DeepSeek's names to its own) and must find
every tensor it needs. It has no Engram, so for a model with Engram the reference adds it with forward pre-hooks on
the Engram layers' decoder blocks, written here from the formula (ARCHITECTURE.md section 2) and not from our
modules: rows = each head's table at its hash id (ids from `EngramHasher`, itself checked against DeepSeek's demo
vectors in tests/kernels/test_engram.py), v = value_proj(rows), k_s = key_proj(rows)[s],
alpha_s = sigmoid(sign(x) sqrt(|x|)), x = <rmsnorm(h_s), rmsnorm(k_s)> / sqrt(D), h_s += alpha_s v.

The default test suite runs `check` on each built-in model's structure at reduced width
(tests/kernels/test_builtin_models.py); the full-size models are checked once, by hand, with
`python -m moemesh.cluster.bench.parity --model v4-flash-mini` (writes the float32 checkpoint to a temporary dir).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

TOL = 1e-4  # max |ours - ref| / max |ref|, as tests/kernels/test_model_vs_transformers.py


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


class _EngramHooks:
    """Engram for transformers' model: `history` (token ids [B, N] so far) is set before each forward; the hook on
    an Engram layer adds the gated rows of the forward's last T positions to the streams [B, T, S, D]."""

    def __init__(self, ref, path: Path):
        from safetensors import safe_open

        from moemesh.kernels.config import ModelConfig
        from moemesh.kernels.engram import EngramHasher, engram_table_sizes

        self.cfg = ModelConfig.from_file(path)
        self.hasher = EngramHasher.from_model_config(self.cfg, path)
        self.history: torch.Tensor | None = None
        self.weights = {}
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] \
            if (path / "model.safetensors.index.json").exists() else None
        for layer in self.cfg.engram_layer_ids:
            parts = {}
            for part in ("embed", "value_proj", "key_proj", "key_norm", "query_norm"):
                name = f"layers.{layer}.engram.{part}.weight"
                with safe_open(path / (index[name] if index else "model.safetensors"), "pt") as f:
                    parts[part] = f.get_tensor(name).float()
            sizes = torch.tensor(engram_table_sizes(self.cfg, layer))
            parts["offsets"] = torch.cumsum(sizes, 0) - sizes
            self.weights[layer] = parts
            ref.model.layers[layer].register_forward_pre_hook(self._hook(layer), with_kwargs=True)

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]                          # [B, T, S, D]
            h = h + self._memory(layer, h)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        return hook

    def _memory(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w, (B, T, S, D) = self.weights[layer], h.shape
        ids = torch.as_tensor(self.hasher.hash(self.history.numpy())[layer][:, -T:])  # [B, T, O*H]
        rows = w["embed"][ids.long() + w["offsets"]].flatten(-2)                       # [B, T, O*H*hd]
        v = rows @ w["value_proj"].T                                                    # [B, T, D]
        k = (rows @ w["key_proj"].T).view(B, T, S, D)
        eps = self.cfg.rms_norm_eps
        x = (_rms(h.float(), w["query_norm"], eps) * _rms(k, w["key_norm"], eps)).sum(-1) / math.sqrt(D)
        alpha = torch.sigmoid(x.sign() * x.abs().sqrt())                                # [B, T, S]
        return (alpha[..., None] * v[:, :, None, :]).to(h.dtype)


def load_reference(path: str | Path):
    """transformers' model of the float32 checkpoint at `path` (plus the Engram hooks when it has Engram)."""
    from transformers import DeepseekV4ForCausalLM

    path = Path(path)
    ref, info = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"{path}: transformers found no tensor for {sorted(info['missing_keys'])[:5]}")
    hooks = _EngramHooks(ref, path) if any(".engram." in k for k in info["unexpected_keys"]) else None
    return ref.eval(), hooks


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check(path: str | Path, prompt_len: int = 120, decode_steps: int = 12, batch: int = 1, seed: int = 0) -> dict:
    """Prefill `batch` random prompts of `prompt_len` tokens, then `decode_steps` greedy cached steps, in our model and
    in the reference; returns {"prefill": rel err, "decode": worst rel err over the steps, seconds per part}. The
    defaults cross V4-Flash's 128-token sliding window and HCA block during decode. One prompt by default: with
    hundreds of experts, float32 rounding (different between the two implementations) now and then flips a near-tie
    in a token's top-k, and that token's row diverges from there on (seen once in a batch of 2 on
    v4.1-flash-mini's structure: one row from position 21 on, the other within 6e-7)."""
    import moemesh

    t0 = time.perf_counter()
    ref, hooks = load_reference(path)
    ours = moemesh.load_model(path, dtype=torch.float32, device="cpu")
    t1 = time.perf_counter()
    ids = torch.randint(3, ref.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    caches = [ours.new_cache() for _ in range(batch)]
    with torch.no_grad():
        if hooks:
            hooks.history = ids
        out = ref(ids, use_cache=True)
        prefill = _rel_err(ours(ids, caches=caches), out.logits)
        t2, decode, history = time.perf_counter(), 0.0, ids
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode_steps):
            history = torch.cat([history, token], dim=1)
            if hooks:
                hooks.history = history
            out = ref(token, past_key_values=out.past_key_values, use_cache=True)
            decode = max(decode, _rel_err(ours(token, caches=caches), out.logits))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    t3 = time.perf_counter()
    return {"prefill": prefill, "decode": decode, "load_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2,
            "tol": TOL, "ok": prefill <= TOL and decode <= TOL}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moemesh.cluster.bench.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a built-in model's name (written in float32 to a temporary "
                                                   "dir) or a float32 checkpoint directory")
    ap.add_argument("--prompt-len", type=int, default=120)
    ap.add_argument("--decode-steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    from moemesh.kernels.builtin import BUILTIN_MODELS, write_builtin_model

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = write_builtin_model(args.model, Path(tmp) / args.model, "float32") \
            if args.model in BUILTIN_MODELS else Path(args.model)
        report = {"model": args.model, "write_s": time.perf_counter() - t,
                  **check(path, args.prompt_len, args.decode_steps, args.batch)}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
