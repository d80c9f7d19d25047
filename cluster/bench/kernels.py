"""Kernel benchmark: each device fast path against the plain-torch reference on the same device, and against the
memory-bandwidth floor (the bytes an op must move at least, at the copy bandwidth measured on this device).

    moemesh bench kernels --device auto --preset v4-flash [--write docs/benchmarks.md]
    python -m moemesh.cluster.bench.kernels --device auto --preset v4-flash      (prints only)

`--write` replaces this run's `## ` section (one per device, dtype and preset) through the section writer the CLI
passes in (cluster/bench/report.py): kernels/ never imports cluster/. On a CPU only the reference exists, so only it
is timed; the report names the device, torch, triton and the path each row used, so a CPU figure is never mistaken
for a GPU one. Reference timings use MOEMESH_KERNELS=reference (kernels/device.py), the documented switch, for the
duration of the call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from moemesh.kernels import device as devices
from moemesh.kernels import fast_paths
from moemesh.kernels.attention import sink_attention
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.engram import gate_alpha
from moemesh.kernels.moe import ExpertBank
from moemesh.kernels.norms import RMSNorm
from moemesh.kernels.packed import PackedExperts

# D hidden, I expert width, E experts held by the shard, N tokens (Nd: a decode step's share, about one token per
# expert, as 32 sequences x top-6 over 256 experts give), k slots, H heads, Dh head dim, S keys,
# L keys each query attends to (window + selected), hc residual streams.
PRESETS = {
    "tiny": dict(D=256, I=128, E=8, N=64, Nd=2, k=6, H=8, Dh=64, S=512, L=160, hc=4),
    "v4-flash": dict(D=4096, I=2048, E=8, N=256, Nd=2, k=6, H=64, Dh=512, S=4096, L=640, hc=4),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1 + 1 / 128 ** 2, "fp4": 0.5 + 1 / 32}


@contextlib.contextmanager
def _reference_kernels():
    saved = os.environ.get("MOEMESH_KERNELS")
    os.environ["MOEMESH_KERNELS"] = "reference"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MOEMESH_KERNELS"]
        else:
            os.environ["MOEMESH_KERNELS"] = saved


def _time_ms(fn: Callable[[], object], dev: torch.device, repeat: int) -> float:
    """Median wall time of `fn` in ms, after two warm-up calls (compilation, caches), device synchronized."""
    for _ in range(2):
        fn()
    devices.synchronize(dev)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        devices.synchronize(dev)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device, mbytes: int = 256) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(mbytes << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), dev, 5)
    return 2 * src.numel() / (ms / 1e3)


def _ops(p: dict, dev: torch.device, dtype: torch.dtype, g: torch.Generator):
    """(op, variant, fast fn, reference fn, bytes moved at least) for every benchmarked op. The fast fn is the
    dispatcher itself, so None from it (a path that declines this dtype/shape) is seen and no fast time reported."""
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dev, dtype)  # noqa: E731
    esize = BYTES[str(dtype).removeprefix("torch.")]
    D, I, E, N, k = p["D"], p["I"], p["E"], p["N"], p["k"]
    norm = RMSNorm(D, 1e-6).to(dev)
    x = rand(N, D)
    yield ("rms_norm", f"[{N}, {D}]", lambda: fast_paths.rms_norm(x, norm.weight, norm.eps), lambda: norm(x),
           2 * N * D * esize)

    cfg = ModelConfig(vocab_size=16, hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                      num_experts_per_tok=k, num_hidden_layers=1, mlp_layer_types=["moe"],
                      layer_types=["sliding_attention"], head_dim=16, num_attention_heads=1, o_groups=1)
    bank = ExpertBank(cfg).requires_grad_(False)
    for w in (bank.w1, bank.w2, bank.w3):
        w.copy_(torch.randn(w.shape, generator=g) * w.shape[-1] ** -0.5)
    bank = bank.to(dev, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(dev)
    wts = torch.rand(N, k, generator=g).to(dev)
    caps = devices.capabilities(dev)
    for fmt in ("float", "fp8", "fp4"):
        if fmt != "float" and not (caps.quantized_experts and (fmt == "fp4" or caps.fp8)):
            continue
        bank.packed = None if fmt == "float" else PackedExperts.from_bank(bank, fmt)
        wbytes = 3 * E * I * D * (esize if fmt == "float" else BYTES[fmt])
        stored = str(dtype).removeprefix("torch.") if fmt == "float" else fmt
        yield ("routed_experts", f"{E} experts {D}x{I}, {N} tokens x {k}, weights {stored}",
               lambda: fast_paths.routed_experts(bank, x, idx, wts), lambda: bank(x, idx, wts),
               wbytes + 2 * N * D * esize)
    bank.packed = None
    yield from _packed_banks(bank, cfg, x, idx, wts, p["Nd"], dtype, esize)

    H, Dh, S, L = p["H"], p["Dh"], p["S"], p["L"]
    q, keys, sink = rand(N, H, Dh), rand(S, Dh), torch.randn(H, generator=g).to(dev)
    allowed = torch.zeros(N, S, dtype=torch.bool)
    for t in range(N):
        allowed[t, torch.randperm(S, generator=g)[:L]] = True
    allowed = allowed.to(dev)
    scale = Dh ** -0.5
    yield ("sink_attention", f"{N} queries x {H} heads, {L} of {S} keys, Dh {Dh}",
           lambda: fast_paths.sink_attention(q, keys, allowed, sink, scale),
           lambda: sink_attention(q, keys, allowed, sink, scale), (2 * N * H * Dh + S * Dh) * esize)

    hc = p["hc"]
    streams, gk, v = rand(N, hc, D), rand(N, hc, D), rand(N, D)
    nw = torch.randn(D, generator=g).to(dev)
    yield ("engram_gate", f"[{N}, {hc}, {D}]", lambda: fast_paths.engram_gate(streams, gk, v, nw, nw, 1e-6),
           lambda: streams + gate_alpha(streams, gk, nw, nw, 1e-6) * v[:, None, :], (3 * N * hc * D + N * D) * esize)


def _packed_banks(bank: ExpertBank, cfg: ModelConfig, x, idx, wts, n_decode: int, dtype: torch.dtype, esize: float):
    """An expert shard's bank (only FP8/FP4 held, each expert decoded when it has tokens) against the float bank
    (the old dequantized form), at N tokens and at a decode step's Nd tokens. On a CPU only the reference runs: the
    float rows time the old form, the packed rows the new one."""
    E, I, D = len(bank.expert_ids), cfg.moe_intermediate_size, cfg.hidden_size
    xd, idxd, wtsd = x[:n_decode], idx[:n_decode], wts[:n_decode]
    yield ("routed_experts", f"{E} experts {D}x{I}, {n_decode} tokens x {idx.shape[1]}, weights "
           f"{str(dtype).removeprefix('torch.')}", lambda: fast_paths.routed_experts(bank, xd, idxd, wtsd),
           lambda: bank(xd, idxd, wtsd), 3 * E * I * D * esize)
    for fmt in ("fp8", "fp4"):
        packed = PackedExperts.from_bank(bank, fmt)
        shard_bank = ExpertBank(cfg, bank.expert_ids, packed=packed, compute_dtype=dtype).to(x.device)
        for xs, ids, ws in ((x, idx, wts), (xd, idxd, wtsd)):
            yield ("routed_experts", f"{E} experts {D}x{I}, {xs.shape[0]} tokens x {ids.shape[1]}, shard bank: "
                   f"{fmt} only, decoded per expert", partial(fast_paths.routed_experts, shard_bank, xs, ids, ws),
                   partial(shard_bank, xs, ids, ws), 3 * E * I * D * BYTES[fmt] + 2 * xs.shape[0] * D * esize)


def run(preset: str, dev: torch.device, dtype: torch.dtype, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    rows = []
    with torch.inference_mode():
        for op, variant, fast, ref, nbytes in _ops(PRESETS[preset], dev, dtype, g):
            has_fast = fast() is not None  # the dispatcher: None where the device path declines
            with _reference_kernels():
                ref_ms = _time_ms(ref, dev, repeat)
            fast_ms = _time_ms(fast, dev, repeat) if has_fast else None
            rows.append({"op": op, "variant": variant, "path": devices.kernel_path(dev) if has_fast else "reference",
                         "fast_ms": fast_ms, "ref_ms": ref_ms, "mbytes": nbytes / 2**20,
                         "floor_ms": nbytes / bandwidth * 1e3, "bandwidth": bandwidth})
    return rows


def report(rows: list[dict], dev: torch.device, dtype: torch.dtype, preset: str, command: str) -> str:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    dt = str(dtype).removeprefix("torch.")
    lines = [f"## Kernels: {devices.capabilities(dev).name}, {dt}, preset {preset}", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
             f"device: {devices.describe(dev)}; dtype {dt}; preset {preset}; "
             f"copy bandwidth {rows[0]['bandwidth'] / 1e9:.1f} GB/s (read + write). Median of the runs; "
             "floor = bytes the op must move / copy bandwidth.", "",
             "| op | shape | path | fast ms | reference ms | speedup | MiB moved | floor ms | fast / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    if all(r["fast_ms"] is None for r in rows):
        lines[-2:-2] = [f"No fast path runs on `{dev}`: reference timings only.", ""]
    for r in rows:
        speed = r["ref_ms"] / r["fast_ms"] if r["fast_ms"] and r["ref_ms"] else None
        ratio = r["fast_ms"] / r["floor_ms"] if r["fast_ms"] else None
        lines.append(f"| {r['op']} | {r['variant']} | {r['path']} | {fmt(r['fast_ms'])} | {fmt(r['ref_ms'])} | "
                     f"{fmt(speed, '.2f')} | {r['mbytes']:.1f} | {r['floor_ms']:.3f} | {fmt(ratio, '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, write_section: Callable[[str, str], None] | None = None) -> int:
    """`moemesh bench kernels ARGS`; `write_section(path, text)` puts the report into a markdown file (--write)."""
    ap = argparse.ArgumentParser(prog="moemesh bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda[:i], npu[:i] or auto (default)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="shapes (default: tiny)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per op (median reported)")
    ap.add_argument("--write", metavar="MD", help="markdown file whose section to replace (e.g. docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: must be >= 1, got {args.repeat}")
    if args.write and write_section is None:
        ap.error("--write: run through `moemesh bench kernels`, which writes docs sections")
    try:
        dev = devices.resolve_device(args.device)
    except (ValueError, devices.DeviceUnavailable) as e:
        ap.exit(2, f"moemesh bench kernels: {e}\n")
    dtype = getattr(torch, args.dtype)
    command = "moemesh bench kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(run(args.preset, dev, dtype, args.repeat), dev, dtype, args.preset, command.strip())
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
