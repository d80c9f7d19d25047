"""What `moemesh bench serve` measured, as JSON (`--json FILE`) and as the markdown section of docs/benchmarks.md.

JSON layout (docs/benchmarks.md explains each field):
- `runs`: one object per measured run: `path` ("monolithic" | "served"), `model`, `micro_batches` (served; null for
  monolithic), `concurrency`, `requests`, `decode_tok_s`, `ttft_p50_s`, `ttft_p99_s`, `tpot_p50_ms`, `tpot_p99_ms`,
  `breakdown` (mean ms per step: `step_ms`, `compute_ms`, `scheduling_ms`; served also `wait_experts_ms`,
  `wait_engram_ms`, `expert_compute_ms`);
- `engram` (a model with Engram): `step_ms_local`, `step_ms_service`, `wait_ms_service`, `step_ms_service_no_cache`;
- `shards`: one object per expert shard: `name`, `expert_bytes`, `rss_bytes`, `empty_rss_bytes`;
- `machine`, `command`, `load`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

TABLE_HEAD = ("| path | micro-batches | concurrency | requests | decode tok/s | TTFT p50 s | TPOT p50 ms | TPOT p99 ms "
              "| step ms | compute | wait experts | wait Engram | scheduling | expert compute |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
PARTS = ("compute_ms", "wait_experts_ms", "wait_engram_ms", "scheduling_ms", "expert_compute_ms")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft: list[float]
    tpot: list[float]

    @property
    def decode_tok_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class Run:
    path: str  # "monolithic" | "served"
    model: str
    micro_batches: int | None
    load: LoadResult
    breakdown: dict[str, float] = field(default_factory=dict)  # mean ms per step

    def as_json(self) -> dict:
        r = self.load
        return {"path": self.path, "model": self.model, "micro_batches": self.micro_batches,
                "concurrency": r.concurrency, "requests": r.requests, "decode_tok_s": round(r.decode_tok_s, 2),
                "ttft_p50_s": _round(pct(r.ttft, 50), 4), "ttft_p99_s": _round(pct(r.ttft, 99), 4),
                "tpot_p50_ms": _round(pct(r.tpot, 50) * 1e3, 2), "tpot_p99_ms": _round(pct(r.tpot, 99) * 1e3, 2),
                "breakdown": {k: round(v, 3) for k, v in self.breakdown.items()}}

    def row(self) -> str:
        r, b = self.load, self.breakdown
        parts = " | ".join(f"{b[k]:.1f}" if k in b else "" for k in PARTS)
        return (f"| {self.path} | {self.micro_batches or ''} | {r.concurrency} | {r.requests} | {r.decode_tok_s:.1f} "
                f"| {pct(r.ttft, 50):.3f} | {pct(r.tpot, 50) * 1e3:.1f} | {pct(r.tpot, 99) * 1e3:.1f} | "
                f"{b.get('step_ms', float('nan')):.1f} | {parts} |")


def _round(x: float, digits: int) -> float | None:
    return None if x != x else round(x, digits)  # NaN (no samples) -> null


def step_breakdown(before: dict, after: dict, shard_compute_s: float = 0.0) -> dict[str, float]:
    """Two snapshots of summed worker step counters (`StepParts.seconds`) -> mean ms per step of the run between."""
    steps = after["steps"] - before["steps"]
    if steps <= 0:
        return {}
    ms = {name: 1e3 * (after[key] - before[key]) / steps
          for name, key in (("step_ms", "total"), ("compute_ms", "compute"), ("wait_experts_ms", "wait_experts"),
                            ("wait_engram_ms", "wait_engram"), ("scheduling_ms", "scheduling")) if key in after}
    ms["expert_compute_ms"] = 1e3 * shard_compute_s / steps
    ms["micro_batches_mean"] = (after["micro_batches"] - before["micro_batches"]) / steps
    return ms


def ratios(runs: list[Run]) -> list[str]:
    """'c=8, 2 micro-batches: served 0.52x monolithic' lines, and 2-vs-1 micro-batch gains where both ran."""
    mono = {r.load.concurrency: r.load.decode_tok_s for r in runs if r.path == "monolithic"}
    served = {(r.micro_batches, r.load.concurrency): r.load.decode_tok_s for r in runs if r.path == "served"}
    lines = [f"c={c}, {mb} micro-batch(es): served {tok / mono[c]:.2f}x monolithic"
             for (mb, c), tok in sorted(served.items()) if c in mono]
    lines += [f"c={c}: {mb} micro-batches {tok / served[(1, c)]:.2f}x 1 micro-batch"
              for (mb, c), tok in sorted(served.items()) if mb != 1 and (1, c) in served]
    return lines


def engram_summary(times: dict[str, list[float]], waits: list[float]) -> dict[str, float]:
    """Per-variant step times (s) of the Engram measurement -> the JSON `engram` object (medians, ms)."""
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"step_ms_local": round(med["local"], 3), "step_ms_service": round(med["service"], 3),
            "wait_ms_service": round(1e3 * statistics.mean(waits), 3),
            "step_ms_service_no_cache": round(med["service_no_cache"], 3)}


def as_json(runs: list[Run], engram: dict | None, shards: list[dict], machine: str, command: str, load: str) -> str:
    return json.dumps({"machine": machine, "command": command, "load": load, "runs": [r.as_json() for r in runs],
                       "engram": engram, "shards": shards}, indent=2)


def markdown(runs: list[Run], engram: dict | None, shards: list[dict], machine: str, command: str,
             load: str) -> str:
    model = runs[0].model if runs else "?"
    lines = [f"## Serving {model} (`moemesh bench serve`)", "", f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Load: {load}", "", "Breakdown columns: mean ms per step (compute = attention, norms, mHC, router and "
             "shared expert on the attention worker; the monolithic engine's compute includes its experts; expert "
             "compute = the shards' busy time per worker step, overlapped with the rest).", "", TABLE_HEAD]
    lines += [r.row() for r in runs]
    lines += ["", *(f"- {line}" for line in ratios(runs))]
    if engram:
        share = engram["wait_ms_service"] / engram["step_ms_service"] if engram["step_ms_service"] else float("nan")
        lines += ["", "Engram (decode step of one attention worker, 8 sequences, median of the steps): "
                  f"tables in the worker {engram['step_ms_local']:.1f} ms; Engram service with the hot-row cache "
                  f"{engram['step_ms_service']:.1f} ms, of which waiting for rows {engram['wait_ms_service']:.2f} ms "
                  f"({100 * share:.1f}%); cache off {engram['step_ms_service_no_cache']:.1f} ms."]
    if shards:
        lines += ["", "| expert shard | expert bytes (MiB) | RSS (MiB) | empty shard RSS (MiB) | RSS / (1.25 x experts "
                  "+ empty) |", "|---|---|---|---|---|"]
        for s in shards:
            bound = 1.25 * s["expert_bytes"] + s["empty_rss_bytes"]
            lines.append(f"| {s['name']} | {s['expert_bytes'] / 2**20:.1f} | {s['rss_bytes'] / 2**20:.1f} | "
                         f"{s['empty_rss_bytes'] / 2**20:.1f} | {s['rss_bytes'] / bound:.2f} |")
    return "\n".join(lines) + "\n"
