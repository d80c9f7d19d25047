"""The device layer and the dispatch glue: device resolution and its errors, torch_npu imported only on request,
CPU numerics untouched by the dispatchers, and the Ascend paths driven through a fake `torch_npu` (npu_fake.py) that
implements each operator's documented formula. Fake-op results are compared with the plain-torch reference at
float32 precision (rtol 1e-5) or, for bf16 attention, at bf16's (atol/rtol 2e-2). The model's hooks (Attention,
EngramMemory, EngramGate -> dispatch) are shown live by replacing a dispatcher with a recording stand-in: the module
must pass it the right tensors and return what it returns; on the CPU the whole model reaches every hook and each
declines, so it runs its reference code unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moemesh import load_model
from moemesh.kernels import device, fast_paths
from moemesh.kernels.attention import Segment, sink_attention
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.moe import ExpertBank, Router
from moemesh.kernels.norms import RMSNorm

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("moemesh_test_npu_fake", HERE / "npu_fake.py")
npu_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(npu_fake)


@pytest.fixture
def fake_npu(monkeypatch):
    """A fake torch_npu in sys.modules, and every dispatcher routed to the torch_npu path (CPU tensors)."""
    mod = npu_fake.make_module()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(fast_paths, "_path", lambda t: "torch_npu")
    monkeypatch.setattr(fast_paths, "_NPU_REFUSED", set())
    return mod


def _cfg(**over) -> ModelConfig:
    base = dict(vocab_size=50, hidden_size=32, moe_intermediate_size=24, n_routed_experts=140, num_experts_per_tok=4,
                num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"], layer_types=["sliding_attention"] * 2,
                head_dim=16, num_attention_heads=2, o_groups=1, swiglu_limit=1.5)
    base.update(over)
    return ModelConfig(**base)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3 + 0.05)
        for name, t in module.named_buffers():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


# ---- resolving devices -----------------------------------------------------------------------------------------------
def test_cpu_and_auto_resolve_here_and_bad_specs_name_the_value():
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available() and not device.torch_npu_installed():
        assert device.resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cpu:2", ""):
        with pytest.raises(ValueError, match=repr(bad)):
            device.resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_why():
    with pytest.raises(device.DeviceUnavailable, match="'cuda:1' requested but (this torch .* CPU-only build|no CUDA)"):
        device.resolve_device("cuda:1")


def test_npu_without_torch_npu_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(device, "torch_npu_installed", lambda: False)
    with pytest.raises(device.DeviceUnavailable, match=r"torch_npu is not installed.*moemesh\[ascend\]"):
        device.resolve_device("npu")


def test_npu_with_broken_cann_says_so(monkeypatch):
    def broken(name):
        raise OSError("libascendcl.so: cannot open shared object file")

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(device, "torch_npu_installed", lambda: True)
    monkeypatch.setattr(device.importlib, "import_module", broken)
    with pytest.raises(device.DeviceUnavailable, match="failed to load.*libascendcl.*set_env.sh"):
        device.resolve_device("npu")


def test_npu_that_sees_no_device_names_the_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", npu_fake.make_module(available=False))
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    with pytest.raises(device.DeviceUnavailable, match="sees no NPU.*ASCEND_RT_VISIBLE_DEVICES='4,5'"):
        device.resolve_device("npu")
    monkeypatch.setitem(sys.modules, "torch_npu", npu_fake.make_module(available=True, count=2))
    with pytest.raises(device.DeviceUnavailable, match="only 2 NPU"):
        device.resolve_device("npu:2")


def test_kernels_mode_reference_and_bad_values(monkeypatch):
    monkeypatch.setenv("MOEMESH_KERNELS", "reference")
    assert device.kernel_path(torch.device("cuda", 0)) == "reference"
    monkeypatch.setenv("MOEMESH_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOEMESH_KERNELS.*'fast'"):
        device.kernel_path(torch.device("cuda", 0))
    monkeypatch.delenv("MOEMESH_KERNELS")
    assert device.kernel_path(torch.device("cpu")) == "reference"
    expected = "triton" if device.triton_available() else "reference"
    assert device.kernel_path(torch.device("cuda", 0)) == expected


def test_cpu_capabilities_and_stats():
    caps = device.capabilities("cpu")
    assert (caps.kernel_path, caps.quantized_experts, caps.fp8) == ("reference", False, False)
    assert device.memory_stats(torch.device("cpu"))["total"] > 0
    assert "kernels: reference" in device.describe(torch.device("cpu"))
    device.synchronize(torch.device("cpu"))


# ---- torch_npu only on request ---------------------------------------------------------------------------------------
_PROBE = textwrap.dedent("""
    import importlib.abc, json, sys
    attempts = []
    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch_npu":
                attempts.append(name)
            return None
    sys.meta_path.insert(0, Watch())
    import torch, moemesh
    from moemesh.kernels import device
    dev = device.resolve_device("cpu")
    model = moemesh.load_model(sys.argv[1], device=dev)
    model(torch.tensor([[3, 1, 4, 1, 5]]))
    device.capabilities(dev), device.describe(dev)
    before = (list(attempts), "torch_npu" in sys.modules)
    npu = device.resolve_device("npu")
    device.synchronize(npu)
    print(json.dumps({"before": before, "after": "torch_npu" in sys.modules, "npu": str(npu),
                      "torch_npu_attr": hasattr(torch, "npu"), "describe": device.describe(npu)}))
""")


def test_cpu_roles_never_import_torch_npu_and_npu_requests_do(tiny_model_dir, tmp_path):
    """In a fresh process where a (fake) torch_npu IS installed: a CPU model load + forward never even looks for
    it; resolve_device('npu') imports it and returns npu:0."""
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    fake = str(HERE / "npu_fake.py")
    (pkg / "__init__.py").write_text("import importlib.util\n"
                                     f"spec = importlib.util.spec_from_file_location('f', {fake!r})\n"
                                     "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
                                     "mod.install_as_package(globals())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    run = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_model_dir)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["before"] == [[], False]
    assert result == {**result, "after": True, "npu": "npu:0", "torch_npu_attr": True}
    assert result["describe"].startswith("npu:0 (FakeAscend), kernels: torch_npu") and "torch_npu 0.0-fake" in \
        result["describe"]


# ---- dispatch: CPU keeps the reference, NPU glue through the fake ----------------------------------------------------
def test_dispatchers_decline_cpu_tensors():
    x = torch.randn(3, 8)
    assert fast_paths.rms_norm(x, torch.ones(8), 1e-6) is None
    assert fast_paths.gating_topk(x, torch.zeros(8), 2, "sigmoid", True, 1.0) is None
    assert fast_paths.sink_attention(torch.randn(2, 2, 8), x, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2),
                                   0.3) is None
    assert fast_paths.engram_lookup(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), x) is None
    assert fast_paths.engram_gate(x[None], x[None], x, torch.ones(8), torch.ones(8), 1e-6) is None
    bank = ExpertBank(_cfg(), [0, 1])
    assert fast_paths.routed_experts(bank, x[:, :1].expand(3, 32), torch.zeros(3, 4, dtype=torch.long),
                                   torch.ones(3, 4)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_npu_rms_norm_glue(fake_npu, dtype):
    norm = RMSNorm(40, 1e-6)
    _randomize(norm, 1)
    x = (torch.randn(6, 40) + 0.1).to(dtype)
    got = norm(x)
    assert fake_npu.calls[-1][0] == "npu_rms_norm"
    ref = (norm.weight.to(dtype).double() * x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True)
                                                                       + 1e-6))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_npu_grouped_matmul_glue_chunks_over_128_experts(fake_npu, monkeypatch):
    cfg = _cfg()
    held = list(range(135))  # more than one 128-group call; experts 135..139 held elsewhere
    bank = ExpertBank(cfg, held)
    _randomize(bank, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 32, generator=g)
    indices = torch.randint(-1, 140, (50, 4), generator=g)
    weights = torch.rand(50, 4, generator=g) + 0.1
    got = bank(x, indices, weights)
    calls = [kw for name, kw in fake_npu.calls if name == "npu_grouped_matmul"]
    assert calls and all(c["groups"] <= 128 and c["group_list_type"] == 1 and c["group_type"] == 0 for c in calls)
    assert {c["groups"] for c in calls} == {128, 7}
    monkeypatch.setattr(fast_paths, "_path", lambda t: "reference")
    torch.testing.assert_close(got, bank(x, indices, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax", "sqrtsoftplus"])
def test_npu_gating_glue(fake_npu, monkeypatch, scoring):
    router = Router(_cfg(scoring_func=scoring, routed_scaling_factor=1.5, n_routed_experts=64), layer=1)
    _randomize(router, 4)
    x = torch.randn(20, 32)
    got_w, got_i = router(x, torch.zeros(20, dtype=torch.long))
    used = [name for name, _ in fake_npu.calls]
    assert used == ([] if scoring == "sqrtsoftplus" else ["npu_moe_gating_top_k"])  # V4's scoring: reference
    monkeypatch.setattr(fast_paths, "_path", lambda t: "reference")
    ref_w, ref_i = router(x, torch.zeros(20, dtype=torch.long))
    order_got, order_ref = got_i.sort(-1), ref_i.sort(-1)
    assert torch.equal(order_got.values, order_ref.values) and got_i.dtype == torch.long
    torch.testing.assert_close(got_w.gather(1, order_got.indices), ref_w.gather(1, order_ref.indices), rtol=1e-5,
                               atol=1e-6)


def test_npu_op_that_raises_falls_back_once_with_a_warning(fake_npu, caplog):
    def refuse(*a, **k):
        raise RuntimeError("EZ1001: expert num must be 256")

    fake_npu.npu_moe_gating_top_k = refuse
    router = Router(_cfg(scoring_func="sigmoid"), layer=1)
    _randomize(router, 5)
    for _ in range(2):
        w, i = router(torch.randn(4, 32), torch.zeros(4, dtype=torch.long))
        assert w.shape == i.shape == (4, 4)
    assert sum("EZ1001" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("heads", [3, 130])  # 130 > 64 query heads per K=V head: two calls
def test_npu_attention_glue_restores_the_sink(fake_npu, heads):
    g = torch.Generator().manual_seed(6)
    T, S, Dh = 5, 23, 16
    q = torch.randn(T, heads, Dh, generator=g).bfloat16()
    keys = torch.randn(S, Dh, generator=g).bfloat16()
    allowed = torch.rand(T, S, generator=g) < 0.5
    allowed[:, 0] = True
    sink = torch.randn(heads, generator=g) * 2
    got = fast_paths.sink_attention(q, keys, allowed, sink, Dh ** -0.5)
    calls = [kw for name, kw in fake_npu.calls if name == "npu_fused_infer_attention_score"]
    assert len(calls) == -(-heads // 64) and all(c["softmax_lse_flag"] and c["num_key_value_heads"] == 1
                                                 for c in calls)
    ref = sink_attention(q.double(), keys.double(), allowed, sink.double(), Dh ** -0.5)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    assert fast_paths.sink_attention(q.float(), keys.float(), allowed, sink, 0.25) is None  # fp32: not supported


# ---- the model's hooks: CPU numerics unchanged, and each hook's result is what the module returns --------------------
def _two_steps(model, layer_fn):
    """Feed `layer_fn(x, positions, segments)` a 37-token prefill of sequence A, then A's next token with sequence B's
    9-token first chunk (fresh caches of `model`) -> the two outputs. Same random inputs on every call."""
    g = torch.Generator().manual_seed(7)
    caches, outs = [model.new_cache() for _ in range(2)], []
    for lens in ([37], [1, 9]):
        segments, positions, start = [], [], 0
        for cache, n in zip(caches, lens):
            segments.append(Segment(start, n, cache))
            positions.append(torch.arange(cache.length, cache.length + n))
            start, cache.length = start + n, cache.length + n
        x = torch.randn(start, model.config.hidden_size, generator=g).to(model.dtype)
        outs.append(layer_fn(x, torch.cat(positions), segments))
    return outs


def _spy(monkeypatch, name: str, result):
    """Replace dispatch.<name> by a function that records its arguments and returns result(*args, **kwargs)."""
    calls = []

    def hook(*args, **kwargs):
        calls.append((args, kwargs))
        return result(*args, **kwargs)

    monkeypatch.setattr(fast_paths, name, hook)
    return calls


def test_cpu_model_reaches_every_hook_and_each_declines(tiny_model_dir, monkeypatch):
    """On the CPU every hook is called and returns None, so each module runs its own reference code, bit for bit
    (prefill with CSA selection and Engram, then decode). The decline reads no environment: a bad MOEMESH_KERNELS,
    an error on a device, goes unnoticed."""
    hooks = ("rms_norm", "routed_experts", "gating_topk", "sink_attention", "engram_lookup", "engram_gate")
    returned: dict[str, list] = {}
    for name in hooks:
        def hook(*args, _name=name, _real=getattr(fast_paths, name), **kwargs):
            returned.setdefault(_name, []).append(_real(*args, **kwargs))
            return returned[_name][-1]

        monkeypatch.setattr(fast_paths, name, hook)
    monkeypatch.setenv("MOEMESH_KERNELS", "not-a-mode")
    model = load_model(tiny_model_dir)
    prompt = torch.randint(3, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(8))
    caches = [model.new_cache() for _ in range(2)]
    model(prompt, caches=caches), model(prompt[:, -1:], caches=caches)
    assert sorted(returned) == sorted(hooks)
    assert all(out is None for outs in returned.values() for out in outs)


@pytest.mark.parametrize("layer", [0, 1, 2])  # sliding, CSA, HCA
def test_attention_calls_the_sink_attention_hook_and_returns_its_result(tiny_model_dir, monkeypatch, layer):
    """Attention._attend hands fast_paths.sink_attention its q, keys, mask, sink and scale, plus key lists that name
    exactly the allowed keys (ascending, no host sync); the hook's result (here the float64 reference) is what the
    module uses, and a hook returning zeros zeroes the module's output."""
    model = load_model(tiny_model_dir)
    attn = model.layers[layer].attn
    plain = _two_steps(model, attn)
    calls = _spy(monkeypatch, "sink_attention", lambda q, keys, allowed, sink, scale, key_lists=None: sink_attention(
        q.double(), keys.double(), allowed, sink.double(), scale).to(q.dtype))
    hooked = _two_steps(model, attn)
    assert len(calls) == 3  # one per segment: A, then A and B
    for (q, keys, allowed, sink, scale), kwargs in calls:
        assert sink is attn.attn_sink and scale == attn.head_dim ** -0.5 and allowed.shape == (q.shape[0], len(keys))
        lists = kwargs["key_lists"]().long()
        spare = allowed.shape[1]  # -1 slots mark a spare column
        listed = torch.zeros(allowed.shape[0], spare + 1, dtype=torch.bool).scatter_(
            1, torch.where(lists >= 0, lists, spare), True)
        assert torch.equal(listed[:, :spare], allowed)
        valid = [row[row >= 0] for row in lists]
        assert all(torch.equal(v, v.sort().values) and len(v.unique()) == len(v) for v in valid)
    for got, ref in zip(hooked, plain):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    _spy(monkeypatch, "sink_attention", lambda q, *a, **k: torch.zeros_like(q))
    assert all(not out.any() for out in _two_steps(model, attn))


def test_attention_module_through_the_fake_npu(tiny_model_dir, fake_npu, monkeypatch):
    """bf16 CSA attention with every dispatcher on the torch_npu path: the fused attention op runs once per segment
    and the module's output matches the reference path's at bf16 precision."""
    model = load_model(tiny_model_dir, dtype=torch.bfloat16)
    attn = model.layers[1].attn
    got = _two_steps(model, attn)
    assert sum(name == "npu_fused_infer_attention_score" for name, _ in fake_npu.calls) == 3
    monkeypatch.setattr(fast_paths, "_path", lambda t: "reference")
    for a, b in zip(got, _two_steps(model, attn)):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_engram_memory_calls_the_lookup_hook_and_returns_its_result(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir)
    memory = model.layers[1].engram_memory
    g = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.randint(0, int(n), (11,), generator=g) for n in memory.sizes], 1).to(torch.int32)
    plain = memory.lookup(ids)
    calls = _spy(monkeypatch, "engram_lookup", lambda hash_ids, offsets, table: torch.cat(
        [table.double()[offsets[j] + hash_ids[:, j]] for j in range(hash_ids.shape[1])], 1).to(table.dtype))
    assert torch.equal(memory.lookup(ids), plain)
    (hash_ids, offsets, table), _ = calls[0]
    assert hash_ids.dtype == torch.long and offsets is memory.offsets and table is memory.embed.weight
    _spy(monkeypatch, "engram_lookup", lambda hash_ids, offsets, table: torch.full_like(plain, 7.0))
    assert (memory.lookup(ids) == 7.0).all()
    with pytest.raises(ValueError, match="outside its head's table"):  # the bounds check stays before the hook
        memory.lookup(ids + memory.sizes.to(torch.int32))


@pytest.mark.parametrize("form", ["v4.1", "paper"])
def test_engram_gate_calls_the_fused_gate_hook_in_the_v41_form(monkeypatch, form):
    """The v4.1 gate hands fast_paths.engram_gate the streams, key_proj/value_proj outputs, both norm weights and eps,
    and returns the hook's result (here the float64 formula); the paper form (conv after the gate) never calls it."""
    from moemesh.kernels.engram import EngramGate

    cfg = _cfg(hc_mult=3, engram_layer_ids=[1], engram_max_ngram_size=3, engram_n_heads=2, engram_head_dim=8,
               engram_vocab_size=[101, 103], engram_gate_form=form)
    gate = EngramGate(cfg)
    _randomize(gate, 9)
    streams, rows = torch.randn(6, 3, 32), torch.randn(6, cfg.engram_dim)
    plain, _ = gate(streams, rows)

    def fused64(h, k, v, qw, kw, eps):
        def norm(a, w):
            return a.double() * torch.rsqrt(a.double().square().mean(-1, keepdim=True) + eps) * w.double()

        s = (norm(h, qw) * norm(k, kw)).sum(-1) / 32 ** 0.5
        alpha = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())
        return (h.double() + alpha[..., None] * v.double()[:, None, :]).to(h.dtype)

    calls = _spy(monkeypatch, "engram_gate", fused64)
    hooked, state = gate(streams, rows)
    if form == "paper":
        assert calls == [] and torch.equal(hooked, plain)
        return
    (h, k, v, qw, kw, eps), _ = calls[0]
    assert h is streams and k.shape == (6, 3, 32) and v.shape == (6, 32) and state is None
    assert qw is gate.query_norm.weight and kw is gate.key_norm.weight and eps == gate.eps
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    _spy(monkeypatch, "engram_gate", lambda h, *a: torch.zeros_like(h))
    assert not gate(streams, rows)[0].any()
