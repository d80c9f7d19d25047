"""Planner benchmark: our plan vs round-robin and DeepSeek EPLB (global, hierarchical) on synthetic Zipf loads,
scored on fresh decode steps, plus the planner's runtime at 1,024 and 8,192 devices.

    python -m moemesh.cluster.bench.plan [--quick] [--write docs/benchmarks.md]

Method (every figure of the comparison is measured on samples, never on the planning loads):
- loads: `zipf_loads(L, E, s, R * T * top_k, seed)` with seed `SEED` (expert ranks permuted per layer);
- every planner sees the same loads and memory budget (`MemoryBudget()` defaults); the baselines get the slots per
  device our plan chose, rounded up to a whole number (so never less expert memory than ours);
- per planner, `STEPS` decode steps of `SAMPLE_LAYERS` evenly spaced layers: each of the R ranks draws T tokens, each
  token top-k distinct experts from the layer's load distribution; each plan routes them by its own rule; the
  same token draws (common random numbers) serve every planner; figures are means over the samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from moemesh.cluster.bench.report import write_section
from moemesh.cluster.planner.baselines import BASELINES, baseline_slots
from moemesh.cluster.planner.loads import zipf_loads
from moemesh.cluster.planner.plan import Plan, plan
from moemesh.cluster.planner.sample import sample_layer_cost
from moemesh.cluster.planner.shape import PRESETS
from moemesh.cluster.planner.topology import load_topology

SEED = 0
TOKENS_PER_RANK = 64
SAMPLE_LAYERS = 4
STEPS = 2
ZIPF = (0.3, 0.6, 1.0)
MODELS = ("v4-flash", "v4-pro")
PRESET_DEVICES = {"hgx-h200": 1024, "atlas950-superpod": 8192, "gb200-nvl72": 576, "cloudmatrix384": 384,
                  "hgx-h100": 256}
HEADING = "## Placement planner"


@dataclass
class Row:
    preset: str
    model: str
    zipf: float
    planner: str
    domain: str
    slots: float
    balancedness: float
    slowest_share: float
    layer_us: float
    plan_s: float


def sampled(p: Plan, seed: int = SEED) -> tuple[float, float, float]:
    """(balancedness, slowest-tier share of messages, MoE layer time in us), means over fresh decode steps."""
    topo = p.topology
    slow = topo.slowest_tier()
    layers = np.unique(np.linspace(0, p.shape.layers - 1, SAMPLE_LAYERS).round().astype(int))
    bal, share, t = [], [], []
    for layer in layers:
        routing = p.layer_routing(int(layer))
        for step in range(STEPS):
            c = sample_layer_cost(p, int(layer), TOKENS_PER_RANK, np.random.default_rng([seed, int(layer), step]),
                                  routing)
            bal.append(c.balancedness)
            share.append(c.tier_tokens[slow + 1] / c.tier_tokens.sum() if slow >= 0 else 0.0)
            t.append(c.time)
    return float(np.mean(bal)), float(np.mean(share)), float(np.mean(t)) * 1e6


def compare(preset: str, devices: int, model: str, zipf: float, slots: float | None = None) -> list[Row]:
    """Our plan and every baseline on one case; `slots` forces slots per device on everyone."""
    topo = load_topology(preset, devices)
    shape = PRESETS[model]
    loads = zipf_loads(shape.layers, shape.experts, zipf, topo.n_devices * TOKENS_PER_RANK * shape.top_k, SEED)
    t0 = time.perf_counter()
    ours = plan(topo, shape, loads, slots_per_device=slots)
    plans = [(ours, time.perf_counter() - t0)]
    s_base = int(slots) if slots else baseline_slots(ours)
    for fn in BASELINES.values():
        t0 = time.perf_counter()
        plans.append((fn(topo, shape, loads, slots_per_device=s_base), time.perf_counter() - t0))
    rows = []
    for p, secs in plans:
        bal, share, us = sampled(p)
        rows.append(Row(f"{preset} ({topo.n_devices:,})", model, zipf, p.planner,
                        f"{p.grouping.label} x{p.grouping.n_groups}", p.slots_per_device, bal, share, us, secs))
    return rows


def timing(preset: str, devices: int, model: str = "v4-pro", zipf: float = 0.6, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of `plan()` (loads generated outside the timer)."""
    topo = load_topology(preset, devices)
    shape = PRESETS[model]
    loads = zipf_loads(shape.layers, shape.experts, zipf, devices * TOKENS_PER_RANK * shape.top_k, SEED)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan(topo, shape, loads)
        best = min(best, time.perf_counter() - t0)
    return best


def _table(rows: list[Row]) -> str:
    head = ("| preset (devices) | model | Zipf | planner | EP domain | slots/dev | balancedness | slowest-tier share "
            "| MoE layer time (us) | vs EPLB global | plan time (s) |")
    out = [head, "|---" * 11 + "|"]
    for r in rows:
        eplb = next(x.layer_us for x in rows if (x.preset, x.model, x.zipf) == (r.preset, r.model, r.zipf)
                    and x.planner == "eplb-global")
        out.append(f"| {r.preset} | {r.model} | {r.zipf} | {r.planner} | {r.domain} | {r.slots:.2f} | "
                   f"{r.balancedness:.3f} | {r.slowest_share:.3f} | {r.layer_us:.1f} | {r.layer_us / eplb:.2f}x | "
                   f"{r.plan_s:.2f} |")
    return "\n".join(out)


def run(presets, models, zipfs, timing_cases, command: str) -> str:
    """The markdown section (also printed as it goes)."""
    rows = []
    for preset in presets:
        for model in models:
            for z in zipfs:
                got = compare(preset, PRESET_DEVICES[preset], model, z)
                rows += got
                print("\n".join(_table(got).splitlines()[2:]), flush=True)
    two = []
    for preset in presets:
        try:
            two += [r for r in compare(preset, PRESET_DEVICES[preset], "v4-pro", 0.6, slots=2)
                    if r.planner in ("moemesh", "eplb-global")]
        except ValueError as e:
            print(f"2 slots per device on {preset}: {e}")
    times = [(p, d, m, timing(p, d, m)) for p, d, m in timing_cases]
    cpu = f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, numpy {np.__version__}"  # numpy only
    method = (f"Measured with `{command}` on {cpu} ({platform.machine()}). Method: see `cluster/bench/plan.py` "
              f"(seed {SEED}; {TOKENS_PER_RANK} decode tokens per rank per step; {STEPS} fresh steps x "
              f"{SAMPLE_LAYERS} layers per plan; baselines get our slots per device rounded up). Modelled MoE layer "
              "time is dispatch + expert + combine from the cost model in docs/placement.md, on the sampled steps.")
    lines = [HEADING, "", method,
             "", "### Planners compared", "", _table(rows), "",
             "### 2 slots per device (V4-Pro, Zipf 0.6)", "", _table(two) if two else "(no case fits)", "",
             "### Planning time (`plan()`, best of 3, V4-Pro, Zipf 0.6)", "",
             "| preset | devices | layers x experts | seconds |", "|---|---|---|---|"]
    for p, d, m, s in times:
        shape = PRESETS[m]
        lines.append(f"| {p} | {d:,} | {shape.layers} x {shape.experts} | {s:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """`moemesh bench plan ARGS`; `command`: how the caller was invoked, recorded with the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="H200 and NVL72 at Zipf 0.6 only")
    ap.add_argument("--presets", nargs="*", default=list(PRESET_DEVICES))
    ap.add_argument("--write", help="markdown file to put the section into (e.g. docs/benchmarks.md)")
    args = ap.parse_args(argv)
    presets = ["hgx-h200", "gb200-nvl72"] if args.quick else args.presets
    zipfs = (0.6,) if args.quick else ZIPF
    timing_cases = [("hgx-h200", 1024, "v4-pro"), ("atlas950-superpod", 8192, "v4-pro")]
    command = command or "python -m moemesh.cluster.bench.plan" + (" --quick" if args.quick else "") + \
        (f" --write {args.write}" if args.write else "")
    section = run(presets, MODELS, zipfs, timing_cases, command)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
