"""Every Triton kernel against a float64 reference: on the CPU through the Triton interpreter, and on a CUDA GPU when
the machine has one. The `module/` cases run the model's own modules (Attention of each kind, Engram lookup and gate,
the whole tiny model) with the dispatcher routed to Triton, so they test the hooks in attention.py / engram.py too,
and check that each Triton entry point was called.

Error = max |fast - ref| / max |ref| over the output, ref computed in float64 from the very same inputs (for FP8/FP4
weights, from their exact dequantized values, so in-kernel decoding must be exact). Bound per output dtype, with
eps = torch.finfo(dtype).eps: float32 100·eps (1.2e-5: float32 accumulation in another order); bfloat16 and float16
2·eps (1.6e-2 / 2.0e-3: rounding of the output and of the SwiGLU intermediate). Index kernels must match exactly.
Inputs are fresh random normals every run, nudged away from zero; a failure prints the seed (rerun with
MOEMESH_TEST_SEED=<seed>).

The interpreter is chosen when `@triton.jit` runs, i.e. when a kernel module is imported, so it cannot be switched on
inside this pytest process (and must not be: it would also catch the GPU runs). This file therefore runs itself in a
subprocess with TRITON_INTERPRET=1 and reports JSON; pytest never imports the kernels for CPU use.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import secrets
import subprocess
import sys
from functools import partial

import pytest
import torch

if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
    pytest.importorskip("triton", reason="triton ships wheels for Linux x86_64 only")  # elsewhere: truly absent
else:
    import triton  # noqa: F401  - the dev extra installs it here; a missing triton is a failure, not a skip

SEED = int(os.environ.get("MOEMESH_TEST_SEED") or secrets.randbelow(2**31))
BOUND = {torch.float32: 100 * torch.finfo(torch.float32).eps, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
         torch.float16: 2 * torch.finfo(torch.float16).eps}


def _rand(g: torch.Generator, *shape, dev, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=g) * scale
    t = torch.where(t.abs() < 1e-3 * scale, torch.full_like(t, 1e-3 * scale), t)  # no zeros
    return t.to(dev, dtype)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max())


# ---- cases: (device, generator) -> (error, bound) --------------------------------------------------------------------
def case_rms_norm(dtype):
    def run(dev, g):
        from moemesh.kernels import triton_norm

        x, w = _rand(g, 7, 3, 200, dev=dev, dtype=dtype), _rand(g, 200, dev=dev)
        ref = w.double() * x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6)
        return _rel(triton_norm.rms_norm(x, w, 1e-6), ref), BOUND[dtype]
    return run


def case_experts(dtype, n_tokens, fmt="float", scale_fmt="ue8m0"):
    """ExpertBank.forward through dispatch (sort, grouped SwiGLU GEMM, grouped down GEMM, un-permute): 8 experts,
    5 held (one gets no token), k=3 with -1 slots and experts held elsewhere."""
    def run(dev, g):
        from moemesh.kernels import fast_paths
        from moemesh.kernels.config import ModelConfig
        from moemesh.kernels.moe import ExpertBank
        from moemesh.kernels.packed import PackedExperts

        D, I, E, k, limit = 80, 48, 8, 3, 1.5
        cfg = ModelConfig(vocab_size=16, hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                          num_experts_per_tok=k, num_hidden_layers=1, mlp_layer_types=["moe"],
                          layer_types=["sliding_attention"], head_dim=16, num_attention_heads=1, o_groups=1,
                          swiglu_limit=limit)
        bank = ExpertBank(cfg, [0, 2, 3, 5, 7]).requires_grad_(False)
        for name in ("w1", "w2", "w3"):
            getattr(bank, name).copy_(_rand(g, *getattr(bank, name).shape, dev="cpu", scale=getattr(
                bank, name).shape[-1] ** -0.5))
        bank = bank.to(dev, dtype)
        if fmt != "float":
            bank.packed = PackedExperts.from_bank(bank, fmt, scale_fmt)
        x = _rand(g, n_tokens, D, dev=dev, dtype=dtype)
        idx = torch.randint(-1, E, (n_tokens, k), generator=g)
        idx[idx == 3] = 1  # held expert 3 gets no token; 1 is held elsewhere
        idx[0, 0] = 0  # at least one held pair: an all-zero reference would make the relative error 0/0
        w = (torch.rand(n_tokens, k, generator=g) + 0.1)
        got = _with_triton_path(fast_paths, dev, lambda: bank(x, idx.to(dev), w.to(dev)))
        src = bank.packed or PackedExperts.from_bank(bank, "float")
        W1, W2, W3 = (p.dequantize().double().cpu() for p in (src.w1, src.w2, src.w3))
        ref = torch.zeros(n_tokens, D, dtype=torch.float64)
        x64 = x.double().cpu()
        for t in range(n_tokens):
            for j in range(k):
                s = int(bank.slot_of[idx[t, j]])
                if s >= 0:
                    gate, up = (W1[s] @ x64[t]).clamp(max=limit), (W3[s] @ x64[t]).clamp(-limit, limit)
                    ref[t] += float(w[t, j]) * (W2[s] @ (torch.nn.functional.silu(gate) * up))
        assert got.dtype == dtype and got.shape == ref.shape
        return _rel(got, ref), BOUND[dtype]
    return run


def case_experts_without_tokens(dev, g):
    from moemesh.kernels import fast_paths
    from moemesh.kernels.config import ModelConfig
    from moemesh.kernels.moe import ExpertBank

    cfg = ModelConfig(vocab_size=16, hidden_size=32, moe_intermediate_size=16, n_routed_experts=4,
                      num_experts_per_tok=2, num_hidden_layers=1, mlp_layer_types=["moe"],
                      layer_types=["sliding_attention"], head_dim=16, num_attention_heads=1, o_groups=1)
    bank = ExpertBank(cfg, [1, 2]).to(dev)
    x = _rand(g, 5, 32, dev=dev)
    for idx in (torch.zeros(0, 2, dtype=torch.long), torch.tensor([[0, 3]] * 5), torch.full((5, 2), -1)):
        got = _with_triton_path(fast_paths, dev, lambda: bank(x[: idx.shape[0]], idx.to(dev), torch.ones(idx.shape,
                                                                                                      device=dev)))
        assert got.shape == (idx.shape[0], 32) and not got.any()  # nothing held here: zeros, as the reference
    return 0.0, 0.0


def case_tiny_checkpoint_experts(dev, g):
    """The built-in tiny checkpoint's FP4 experts of layer 1, as stored (never dequantized in full), through the
    Triton path, against the reference bank loaded dequantized (float32)."""
    from moemesh.kernels import fast_paths
    from moemesh.kernels.checkpoint import Checkpoint
    from moemesh.kernels.moe import ExpertBank
    from moemesh.kernels.packed import PackedExperts
    from moemesh.kernels.weights import expert_tensor_names

    ckpt = Checkpoint(os.environ["MOEMESH_TEST_TINY_MODEL"])
    cfg, layer = ckpt.config, 1
    ids = list(range(0, cfg.n_routed_experts, 2))
    names = [n for e in ids for n in expert_tensor_names(layer, e)]
    bank = ExpertBank(cfg, ids).requires_grad_(False)
    floats = ckpt.read(names)
    for slot, e in enumerate(ids):
        for part, name in zip(("w1", "w2", "w3"), expert_tensor_names(layer, e)):
            getattr(bank, part)[slot].copy_(floats[name])
    bank = bank.to(dev)
    bank.packed = PackedExperts.from_stored(ckpt.read(names, dequantize=False), layer, ids).to(dev)
    assert bank.packed.w1.fmt == "fp4"
    x = _rand(g, 21, cfg.hidden_size, dev=dev)
    idx = torch.randint(0, cfg.n_routed_experts, (21, cfg.num_experts_per_tok), generator=g).to(dev)
    w = (torch.rand(21, cfg.num_experts_per_tok, generator=g) + 0.1).to(dev)
    got = _with_triton_path(fast_paths, dev, lambda: bank(x, idx, w))
    bank64 = bank.double()
    bank64.packed = None
    ref = _on_path(fast_paths, "reference", lambda: bank64(x.double(), idx, w.double()))
    return _rel(got, ref), BOUND[torch.float32]


def case_packed_only_bank(dev, g):
    """An expert shard's bank: packed FP4 only (no float copy, w1/w2/w3 None), from the tiny checkpoint as stored,
    through the Triton path; the reference is the same bank decoding one expert at a time, in float64 inputs."""
    from moemesh.kernels import fast_paths
    from moemesh.kernels.checkpoint import Checkpoint
    from moemesh.kernels.moe import ExpertBank
    from moemesh.kernels.packed import PackedExperts
    from moemesh.kernels.weights import expert_tensor_names

    ckpt = Checkpoint(os.environ["MOEMESH_TEST_TINY_MODEL"])
    cfg, layer, ids = ckpt.config, 2, [1, 4, 6, 9, 15]
    names = [n for e in ids for n in expert_tensor_names(layer, e)]
    packed = PackedExperts.from_stored(ckpt.read(names, dequantize=False), layer, ids)
    bank = ExpertBank(cfg, ids, packed=packed.to(dev)).to(dev)
    assert bank.is_packed and bank.packed.w1.fmt == "fp4"
    x = _rand(g, 13, cfg.hidden_size, dev=dev)
    idx = torch.randint(0, cfg.n_routed_experts, (13, cfg.num_experts_per_tok), generator=g).to(dev)
    w = (torch.rand(13, cfg.num_experts_per_tok, generator=g) + 0.1).to(dev)
    got = _with_triton_path(fast_paths, dev, lambda: bank(x, idx, w))
    ref_bank = ExpertBank(cfg, ids, packed=packed.to(dev), compute_dtype=torch.float64).to(dev)
    ref = _on_path(fast_paths, "reference", lambda: ref_bank(x.double(), idx, w.double()))
    return _rel(got, ref), BOUND[torch.float32]


def case_linear(fmt):
    def run(dev, g):
        from moemesh.kernels import triton_moe
        from moemesh.kernels.packed import PackedWeight

        x, w = _rand(g, 33, 300, dev=dev), _rand(g, 1, 130, 300, dev=dev, scale=300 ** -0.5)
        packed = PackedWeight.quantize(w, fmt)
        ref = x.double() @ packed.dequantize()[0].double().T
        return _rel(triton_moe.quantized_linear(x, packed), ref), BOUND[torch.float32]
    return run


def case_block_table(dev, g):
    from moemesh.kernels import triton_moe

    counts = torch.tensor([5, 0, 17, 1, 0, 33], device=dev)
    ex, lo, hi = (t.cpu() for t in triton_moe.block_table(counts, 16, int(counts.sum())))
    starts = torch.cumsum(counts.cpu(), 0) - counts.cpu()
    covered = []
    for e_, l_, h_ in zip(ex.tolist(), lo.tolist(), hi.tolist()):
        if e_ < 0:
            continue
        assert starts[e_] <= l_ < h_ == starts[e_] + counts[e_] and min(h_, l_ + 16) > l_
        covered += range(l_, min(h_, l_ + 16))
    assert covered == list(range(int(counts.sum()))), covered
    return 0.0, 0.0


def case_attention(dtype):
    def run(dev, g):
        from moemesh.kernels import triton_attention
        from moemesh.kernels.attention import sink_attention

        T, H, Dh, S = 9, 5, 40, 70
        q, keys = _rand(g, T, H, Dh, dev=dev, dtype=dtype), _rand(g, S, Dh, dev=dev, dtype=dtype)
        sink = _rand(g, H, dev=dev)
        pos = torch.arange(S - T, S)
        allowed = ((pos[:, None] - torch.arange(S)) >= 0) & ((pos[:, None] - torch.arange(S)) < 8)  # window
        allowed |= torch.rand(T, S, generator=g) < 0.3  # selected compressed entries
        allowed[4] = False  # a query that sees nothing but the sink
        idx = triton_attention.mask_to_indices(allowed.to(dev))
        got = triton_attention.sparse_sink_attention(q, keys, idx, sink, Dh ** -0.5)
        ref = sink_attention(q.double().cpu(), keys.double().cpu(), allowed, sink.double().cpu(), Dh ** -0.5)
        return _rel(got, ref), BOUND[dtype]
    return run


def case_engram_gather(dev, g):
    from moemesh.kernels import triton_engram

    sizes, hd, N = [11, 13, 17, 19, 23, 29], 20, 15
    offsets = torch.tensor([0, *torch.cumsum(torch.tensor(sizes), 0)[:-1].tolist()], device=dev)
    table = _rand(g, sum(sizes), hd, dev=dev, dtype=torch.bfloat16)
    ids = torch.stack([torch.randint(0, s, (N,), generator=g) for s in sizes], 1).to(dev)
    expected = torch.nn.functional.embedding(ids + offsets, table).flatten(-2)
    assert torch.equal(triton_engram.gather_rows(ids, offsets, table), expected)
    return 0.0, 0.0


def case_engram_gate(dtype):
    def run(dev, g):
        from moemesh.kernels import triton_engram

        T, S, D = 6, 4, 72
        h, k = _rand(g, T, S, D, dev=dev, dtype=dtype), _rand(g, T, S, D, dev=dev, dtype=dtype)
        v, qw, kw = _rand(g, T, D, dev=dev, dtype=dtype), _rand(g, D, dev=dev), _rand(g, D, dev=dev)

        def norm(a, w):
            a = a.double().cpu()
            return a * torch.rsqrt(a.square().mean(-1, keepdim=True) + 1e-6) * w.double().cpu()

        s = (norm(h, qw) * norm(k, kw)).sum(-1) / math.sqrt(D)
        alpha = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())
        ref = h.double().cpu() + alpha[..., None] * v.double().cpu()[:, None, :]
        return _rel(triton_engram.engram_gate(h, k, v, qw, kw, 1e-6), ref), BOUND[dtype]
    return run


# ---- the model's modules through the dispatcher (the hooks in attention.py / engram.py, not just the kernels) -------
def case_attention_module(dev, g):
    """`Attention.forward` of the tiny checkpoint's sliding, CSA and HCA layers (0, 1, 2) through the dispatcher:
    Triton RMSNorm and sparse sink attention, the key lists built by `attention.key_lists` (never from the mask). A
    37-token prefill of sequence A, then one step holding A's next token and sequence B's 9-token first chunk; the
    float64 reference is the same checkpoint loaded in float64 on the reference path, fed the same inputs."""
    from moemesh.kernels import fast_paths, triton_attention
    from moemesh.kernels.attention import Segment

    model, model64 = _tiny_models(dev)
    steps = [[37], [1, 9]]  # tokens per sequence in each step (A, then A and B)
    xs = [_rand(g, sum(lens), model.config.hidden_size, dev=dev) for lens in steps]
    err = 0.0
    for layer in (0, 1, 2):
        runs = {}
        for name, m in (("fast", model), ("ref", model64)):
            caches = [m.new_cache() for _ in range(2)]
            outs = []
            for lens, x in zip(steps, xs):
                segments, positions, start = [], [], 0
                for cache, n in zip(caches, lens):
                    segments.append(Segment(start, n, cache))
                    positions.append(torch.arange(cache.length, cache.length + n, device=m.device))
                    start, cache.length = start + n, cache.length + n
                attn = m.layers[layer].attn
                if name == "fast":
                    with _counting(triton_attention, "sparse_sink_attention", "mask_to_indices") as calls:
                        outs.append(_with_triton_path(fast_paths, dev, partial(attn, x, torch.cat(positions),
                                                                             segments)))
                    assert calls == {"sparse_sink_attention": len(lens), "mask_to_indices": 0}, calls
                else:
                    outs.append(attn(x.double().cpu(), torch.cat(positions).cpu(), segments))
            runs[name] = torch.cat(outs)
        err = max(err, _rel(runs["fast"], runs["ref"]))
    return err, BOUND[torch.float32]


def case_engram_modules(dev, g):
    """`EngramMemory.lookup` (Triton row gather; must equal the reference lookup exactly) and `EngramGate.forward`
    (fused v4.1 gate, against the float64 checkpoint's gate) of the tiny checkpoint's Engram layer 1."""
    from moemesh.kernels import fast_paths, triton_engram

    model, model64 = _tiny_models(dev)
    memory, gate = model.layers[1].engram_memory, model.layers[1].engram
    assert gate.form == "v4.1", gate.form
    T = 23
    ids = torch.stack([torch.randint(0, int(n), (T,), generator=g) for n in memory.sizes.cpu()], 1).to(dev)
    streams = _rand(g, T, gate.streams, gate.dim, dev=dev)
    with _counting(triton_engram, "gather_rows", "engram_gate") as calls:
        rows = _with_triton_path(fast_paths, dev, lambda: memory.lookup(ids))
        got, state = _with_triton_path(fast_paths, dev, lambda: gate(streams, rows))
    assert calls == {"gather_rows": 1, "engram_gate": 1} and state is None, calls
    assert torch.equal(rows, _on_path(fast_paths, "reference", lambda: memory.lookup(ids))), \
        "Triton row gather differs from the reference lookup"
    ref, _ = model64.layers[1].engram(streams.double().cpu(), rows.double().cpu())
    return _rel(got, ref), BOUND[torch.float32]


def case_tiny_model(dev, g):
    """The whole tiny model with every dispatcher on its Triton path: a 2 x 36-token prefill, then one decode step
    per sequence, logits against the float64 checkpoint's. Every kernel family must have run."""
    from moemesh.kernels import fast_paths, triton_attention, triton_engram, triton_moe, triton_norm

    model, model64 = _tiny_models(dev)
    prompt = torch.randint(3, model.config.vocab_size, (2, 36), generator=g)
    nxt = torch.randint(3, model.config.vocab_size, (2, 1), generator=g)
    caches, caches64 = [model.new_cache() for _ in range(2)], [model64.new_cache() for _ in range(2)]
    with contextlib.ExitStack() as stack:
        calls = [stack.enter_context(_counting(mod, *names)) for mod, names in (
            (triton_attention, ("sparse_sink_attention",)), (triton_engram, ("gather_rows", "engram_gate")),
            (triton_norm, ("rms_norm",)), (triton_moe, ("swiglu_up",)))]
        got = [_with_triton_path(fast_paths, dev, partial(model, ids.to(dev), caches=caches)) for ids in (prompt, nxt)]
    assert all(n > 0 for c in calls for n in c.values()), calls
    ref = [model64(ids, caches=caches64) for ids in (prompt, nxt)]
    return max(_rel(a, b) for a, b in zip(got, ref)), BOUND[torch.float32]


def _tiny_models(dev):
    """The tiny checkpoint in float32 on `dev`, and in float64 on the CPU (the reference)."""
    from moemesh import load_model

    path = os.environ["MOEMESH_TEST_TINY_MODEL"]
    return load_model(path, device=dev), load_model(path, dtype=torch.float64)


@contextlib.contextmanager
def _counting(module, *names):
    """Count calls of module-level functions (the dispatcher looks them up on the module at each call)."""
    calls, saved = dict.fromkeys(names, 0), {n: getattr(module, n) for n in names}

    def counted(name):
        def fn(*args, **kwargs):
            calls[name] += 1
            return saved[name](*args, **kwargs)
        return fn

    for name in names:
        setattr(module, name, counted(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _with_triton_path(fast_paths, dev, fn):
    """On CPU tensors (interpreter), route the dispatcher to the Triton path; on CUDA it goes there by itself."""
    return fn() if dev.type != "cpu" else _on_path(fast_paths, "triton", fn)


def _on_path(fast_paths, path, fn):
    """fn() with every dispatcher routed to `path` (on CUDA too: "reference" there gives the plain-torch oracle)."""
    saved = fast_paths._path
    fast_paths._path = lambda t: path
    try:
        return fn()
    finally:
        fast_paths._path = saved


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = {
    "rms_norm/float32": case_rms_norm(F32), "rms_norm/bfloat16": case_rms_norm(BF16),
    "rms_norm/float16": case_rms_norm(F16),
    "experts/float32/prefill": case_experts(F32, 40), "experts/float32/decode": case_experts(F32, 3),
    "experts/bfloat16/prefill": case_experts(BF16, 40),
    "experts/fp8-ue8m0": case_experts(F32, 40, "fp8"),
    "experts/fp8-float32-scales": case_experts(F32, 40, "fp8", "float32"),
    "experts/fp4-ue8m0": case_experts(F32, 40, "fp4"),
    "experts/fp4-float32-scales": case_experts(F32, 40, "fp4", "float32"),
    "experts/bfloat16-fp4-ue8m0/decode": case_experts(BF16, 3, "fp4"),
    "experts/tiny-checkpoint-fp4-as-stored": case_tiny_checkpoint_experts,
    "experts/packed-only-bank": case_packed_only_bank,
    "experts/no-held-pairs": case_experts_without_tokens,
    "linear/fp8": case_linear("fp8"), "linear/fp4": case_linear("fp4"),
    "block_table": case_block_table,
    "attention/float32": case_attention(F32), "attention/bfloat16": case_attention(BF16),
    "engram/gather": case_engram_gather,
    "engram/gate-float32": case_engram_gate(F32), "engram/gate-bfloat16": case_engram_gate(BF16),
    "module/attention-sliding-csa-hca": case_attention_module, "module/engram-lookup-and-gate": case_engram_modules,
    "module/tiny-model-prefill-and-decode": case_tiny_model,
}


def run_case(name: str, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(SEED + sorted(CASES).index(name))
    try:
        err, bound = CASES[name](dev, g)
    except Exception as e:  # noqa: BLE001 - reported to the test that owns the case
        return {"ok": False, "detail": f"{type(e).__name__}: {e}"}
    return {"ok": err <= bound, "detail": f"relative error {err:.3g}, bound {bound:.3g}"}


# ---- pytest ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted(tiny_model_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOEMESH_TEST_SEED": str(SEED), "MOEMESH_KERNELS": "auto",
           "MOEMESH_TEST_TINY_MODEL": str(tiny_model_dir)}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_interpreter_matches_float64(interpreted, name):
    result = interpreted[name]
    assert result["ok"], f"{name}: {result['detail']} (seed {SEED})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter run covers the CPU)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_cuda_matches_float64(name, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MOEMESH_TEST_TINY_MODEL", str(tiny_model_dir))
    result = run_case(name, torch.device("cuda"))
    assert result["ok"], f"{name}: {result['detail']} (seed {SEED})"


if __name__ == "__main__":  # the interpreter run (see the module docstring)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    print(json.dumps({name: run_case(name, torch.device("cpu")) for name in sorted(CASES)}))
