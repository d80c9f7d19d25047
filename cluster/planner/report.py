"""`moemesh plan`: plan a model on a topology and print the predicted figures, next to the baselines.

    moemesh plan --topology deploy/topologies/hgx-h200.yaml --model v4-pro [--loads FILE] [--ranks N] [--png FILE]

Without `--loads`, loads are synthetic: Zipf with `--zipf` (default 0.6), or co-activated expert clusters with
`--clusters N` (loads.clustered_loads), seed `--seed`. `--png FILE` also writes a picture
(cluster/planner/picture.py). Wire-up: `add_parser` (argparse subparsers) or `add_args` (a parser), then `run(args)`
returns the exit status.
"""

from __future__ import annotations

import argparse
import time

HELP = "plan expert, attention and Engram placement on a topology and print its predicted figures"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", required=True, help="preset YAML (deploy/topologies/*.yaml) or a preset name")
    p.add_argument("--model", required=True, help="checkpoint directory / config.json, or v4-flash, v4-pro, "
                                                  "v4-pro+engram")
    p.add_argument("--devices", type=int, help="resize the preset to N devices")
    p.add_argument("--loads", help="expert loads: .npy, .json or .safetensors, [layers, experts] or "
                                   "[ranks, layers, experts] (see docs/placement.md)")
    p.add_argument("--zipf", type=float, default=0.6, help="synthetic loads when no --loads: Zipf exponent "
                                                           "(default 0.6)")
    p.add_argument("--clusters", type=int, help="synthetic loads when no --loads: N co-activated expert clusters "
                                                "(per-rank skew; see docs/placement.md) instead of Zipf")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads (default 0)")
    p.add_argument("--ranks", type=int, help="attention ranks (default: one per device)")
    p.add_argument("--disaggregate", action="store_true",
                   help="attention ranks get devices of their own (needs --ranks); default: shared with experts")
    p.add_argument("--tokens-per-rank", type=int, default=64, help="decode tokens per rank per step (default 64)")
    p.add_argument("--slots", type=float, help="expert replicas per device per layer (default: chosen)")
    p.add_argument("--ep-domain", help="force the EP domain, e.g. node, domain, network/4 (default: chosen)")
    p.add_argument("--sequences", type=int, default=64, help="sequences cached per attention rank (default 64)")
    p.add_argument("--context", type=int, default=32768, help="average cached tokens per sequence (default 32768)")
    p.add_argument("--reserve", type=float, default=0.10, help="share of device memory kept free (default 0.10)")
    p.add_argument("--compare", action="store_true",
                   help="also run round-robin, EPLB global and EPLB hierarchical and compare")
    p.add_argument("--png", help="also write a picture of the plan here: devices coloured by load, experts per "
                                 "device, bytes per tier")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help=HELP, description=HELP)
    add_args(p)
    return p


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def summary_row(p, seconds: float) -> dict:
    """One plan's figures as strings, by column."""
    f, topo = p.figures, p.topology
    names = ["device"] + list(topo.tier_names)
    carried = [f"{names[k]} {_gb(b)}" for k, b in enumerate(f.tier_bytes) if b > 0]
    slow = topo.tier_names[f.slowest_tier] if f.slowest_tier >= 0 else "-"
    return {
        "planner": p.planner,
        "EP domain": f"{p.grouping.label} x{p.grouping.n_groups}",
        "slots/dev": f"{p.slots_per_device:.2f}",
        "balancedness": f"{f.balancedness:.3f}",
        "slowest tier share": f"{f.slowest_tier_share:.3f} ({slow})",
        "GB/step by tier": ", ".join(carried) or "0",
        "max mem GB": _gb(f.memory.max()),
        "MoE layer us (disp/expert/comb)": f"{f.layer_time * 1e6:.1f} ({f.dispatch * 1e6:.1f}/{f.expert * 1e6:.1f}/"
                                           f"{f.combine * 1e6:.1f})",
        "plan s": f"{seconds:.2f}",
    }


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip()
    return "\n".join([line({c: c for c in cols}), line({c: "-" * width[c] for c in cols})] + [line(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    from moemesh.cluster.planner.baselines import BASELINES, baseline_slots
    from moemesh.cluster.planner.loads import clustered_loads, read_loads, scale_loads, zipf_loads
    from moemesh.cluster.planner.plan import MemoryBudget, PlanError, plan
    from moemesh.cluster.planner.shape import resolve_model
    from moemesh.cluster.planner.topology import load_topology

    topo = load_topology(args.topology, args.devices)
    shape = resolve_model(args.model)
    ranks = args.ranks
    R = ranks or topo.n_devices
    total = R * args.tokens_per_rank * shape.top_k
    if args.loads:
        loads = scale_loads(read_loads(args.loads), total)
        source = f"{args.loads}, scaled to {args.tokens_per_rank} tokens per rank"
    elif args.clusters:
        loads, _ = clustered_loads(R, shape.layers, shape.experts, args.clusters, total, seed=args.seed)
        source = f"synthetic {args.clusters} co-activated clusters (seed {args.seed}), {args.tokens_per_rank} " \
                 "tokens per rank"
    else:
        loads = zipf_loads(shape.layers, shape.experts, args.zipf, total, args.seed)
        source = f"synthetic Zipf {args.zipf} (seed {args.seed}), {args.tokens_per_rank} tokens per rank"
    memory = MemoryBudget(reserve_fraction=args.reserve, sequences_per_rank=args.sequences,
                          context_tokens=args.context)
    common = dict(attention_ranks=ranks, colocate=not args.disaggregate, memory=memory)
    t0 = time.perf_counter()
    ours = plan(topo, shape, loads, slots_per_device=args.slots, ep_domain=args.ep_domain, **common)
    rows = [summary_row(ours, time.perf_counter() - t0)]
    notes = []
    if args.compare:
        slots = baseline_slots(ours)
        for name, fn in BASELINES.items():
            t0 = time.perf_counter()
            try:
                rows.append(summary_row(fn(topo, shape, loads, slots_per_device=slots, **common),
                                        time.perf_counter() - t0))
            except PlanError as e:
                notes.append(f"{name}: {e}")
    print(f"topology  {topo.summary()}")
    print(f"model     {shape.name}: {shape.layers} layers x {shape.experts} experts (top-{shape.top_k}), "
          f"{shape.expert_bytes / 1e6:.1f} MB per expert")
    print(f"loads     {source}; {'disaggregated' if args.disaggregate else 'colocated'} attention, "
          f"{R} ranks")
    print()
    print(format_table(rows))
    for n in notes:
        print(f"note: {n}")
    print()
    f = ours.figures
    print(f"moemesh plan: {len(ours.expert_groups)} expert group(s) of {len(ours.expert_groups[0])} devices "
          f"({ours.grouping.label}), {ours.replica_expert.shape[1]} replicas per layer, routing: nearest replica "
          f"first, spill by load; migration {_gb(f.migration_bytes)} GB")
    if ours.engram is not None:
        e = ours.engram
        print(f"engram: one copy per {e.level} x{e.host.shape[1]}, {e.n_shards} shards of {_gb(e.shard_bytes)} GB; "
              f"max {_gb(e.host_bytes.max())} GB on a host")
    if args.png:
        from moemesh.cluster.planner.picture import write_plan_png

        print(f"picture: {write_plan_png(ours, args.png)}")
    return 0
