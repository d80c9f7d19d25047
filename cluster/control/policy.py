"""The expert controller's policy, pure: its config, measured rates, how many holders each expert should have
(`autoscale` by a target rate per holder, `rebalance` by water-filling a fixed budget), and which replica actors to
start and stop to get there. No I/O; cluster/control/controller.py applies what this decides."""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moemesh.cluster.placement import Placement
from moemesh.cluster.planner.place import water_fill

log = logging.getLogger("moemesh.controller")
Key = tuple[int, int]  # (layer, expert)


class ReplicaPlacement(Placement):
    """Ray resources each replica actor asks for. A resource that no running node has free (e.g. `NPU`, or a node
    type's marker) makes Ray's autoscaler launch a node of a type that has it."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs each replica actor reserves.")


class AutoscalingConfig(BaseModel):
    """The expert controller's policy (docs/autoscaling.md has the reference, with the formulas)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["autoscale", "rebalance"] = Field(
        "autoscale", description="autoscale: holders per expert from its token rate; rebalance: a fixed budget of "
        "`max_total_replicas` extra replicas spread over the experts with the most load per replica.")
    interval_s: float = Field(5.0, gt=0, description="Seconds between controller ticks.")
    window_s: float = Field(30.0, gt=0, description="Token rates are measured over this trailing window.")
    target_tokens_per_replica_s: float = Field(
        200.0, gt=0, description="autoscale: tokens per second one holder of an expert should serve.")
    min_replicas: int = Field(1, ge=1, description="Holders per expert at least (the base shards give 1).")
    max_replicas: int = Field(4, ge=1, description="Holders per expert at most (base copy included).")
    max_total_replicas: int = Field(32, ge=0, description="Extra replicas over all experts at most (the budget "
                                    "in rebalance mode).")
    experts_per_actor: int = Field(4, ge=1, description="(layer, expert) replicas one replica actor holds: its "
                                   "slots on a device.")
    hysteresis: float = Field(0.2, ge=0, lt=1, description="autoscale: grow when the rate exceeds the holders' "
                              "target by this share; shrink when one holder fewer would still be this share below it.")
    upscale_cooldown_s: float = Field(10.0, ge=0, description="An expert grows again at most this often.")
    downscale_cooldown_s: float = Field(60.0, ge=0, description="An expert shrinks at most this often, and never "
                                        "sooner than this after it grew.")
    rebalance_min_gain: float = Field(0.1, ge=0, description="rebalance: apply a new spread only when it lowers the "
                                      "busiest holder's load by this share.")
    min_rate: float = Field(1.0, ge=0, description="Total tokens/s below which no decision is taken except shrinking "
                            "(no load: no evidence).")
    pool_ttl_s: float = Field(10.0, gt=0, description="An autoscaled attention replica (`attention-pool`) that has "
                              "not reported its map state for this long counts as gone.")
    start_timeout_s: float = Field(600.0, gt=0, description="How long a new replica actor may take to start, a node "
                                   "launch by Ray's autoscaler included; after it the change is abandoned.")
    drain_timeout_s: float = Field(120.0, gt=0, description="How long to wait for dispatches under an old map "
                                   "before stopping its replicas anyway.")
    placement: ReplicaPlacement = Field(default_factory=ReplicaPlacement, description="Resources per replica actor.")

    @model_validator(mode="after")
    def _consistent(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


# ---- rates -----------------------------------------------------------------------------------------------------------
class LoadMeter:
    """Cumulative per-worker counters -> tokens/s per (layer, expert) over a trailing window. A worker whose counters
    went down restarted: its new counts are all new tokens."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._last: dict[str, Counter] = {}
        self._total: Counter = Counter()
        self._history: deque[tuple[float, Counter]] = deque()

    def add(self, now: float, snapshots: Mapping[str, Mapping[Key, int]]) -> None:
        for worker, counts in snapshots.items():
            counts = Counter(counts)
            last = self._last.get(worker, Counter())
            restarted = any(counts[k] < n for k, n in last.items())
            for k, n in counts.items():
                self._total[k] += n if restarted else n - last[k]
            self._last[worker] = counts
        self._history.append((now, Counter(self._total)))
        while len(self._history) > 2 and now - self._history[1][0] >= self.window_s:
            self._history.popleft()

    def since(self) -> float | None:
        """When the trailing window's oldest sample was taken (None: fewer than two samples, no rates yet)."""
        return self._history[0][0] if len(self._history) >= 2 else None

    def rates(self) -> dict[Key, float]:
        if len(self._history) < 2:
            return {}
        (t0, c0), (t1, c1) = self._history[0], self._history[-1]
        dt = max(t1 - t0, 1e-9)
        return {k: (n - c0[k]) / dt for k, n in c1.items() if n > c0[k]}


# ---- the policy (pure) -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """One expert's holder count changed (or a rebalance): what, why, when; logged and exported."""

    time: float
    action: Literal["add", "remove", "rebalance"]
    layer: int
    expert: int
    holders_from: int
    holders_to: int
    rate: float
    reason: str
    cause: str  # the metric label (`Wanted.cause`)


class Wanted(NamedTuple):
    """What the policy wants for one expert: its holder count, why in words, and the cause as one metric label
    (`rate`, `no_load`, `min_replicas`, `max_replicas`, `cap`, `swap`, `budget_lowered`, `rebalance`)."""

    holders: int
    reason: str
    cause: str


def wanted_holders(cfg: AutoscalingConfig, rates: Mapping[Key, float], holders: Mapping[Key, int],
                   now: float, last_up: Mapping[Key, float], last_down: Mapping[Key, float],
                   base: Mapping[Key, int] | None = None) -> dict[Key, int]:
    """Holders wanted per (layer, expert) whose count should change (see `decide_holders`, which also says why)."""
    return {k: w.holders for k, w in decide_holders(cfg, rates, holders, now, last_up, last_down, base).items()}


def decide_holders(cfg: AutoscalingConfig, rates: Mapping[Key, float], holders: Mapping[Key, int],
                   now: float, last_up: Mapping[Key, float], last_down: Mapping[Key, float],
                   base: Mapping[Key, int] | None = None) -> dict[Key, Wanted]:
    """{(layer, expert): Wanted(holders, reason, cause)} for the keys of `holders` (the current counts, base copies
    included) whose count should change, from `rates` (tokens/s). `base`: copies the base shards hold (default 1 each);
    never asked to go below them, and only holders beyond them count against `max_total_replicas`. Pure.

    autoscale: an expert grows when its rate exceeds its holders' target by `hysteresis` (at most every
    `upscale_cooldown_s`, counted from its last change either way) and shrinks when one holder fewer would still be
    `hysteresis` below the target (at most every `downscale_cooldown_s` after its last change). When the growth asked
    for does not fit `max_total_replicas`, running holders stay unless a newcomer's load per holder beats theirs by more
    than `hysteresis` (a swap), and a holder added less than `downscale_cooldown_s` ago is not swapped out: under a
    steady load the set converges (docs/autoscaling.md)."""
    base = {k: (base or {}).get(k, 1) for k in holders}
    if cfg.mode == "rebalance":
        return {k: Wanted(n, f"rebalance: {rates.get(k, 0.0):.1f} tok/s; water-filled budget of "
                             f"{cfg.max_total_replicas} extra replicas ({holders[k]} -> {n} holders)", "rebalance")
                for k, n in _rebalance(cfg, rates, holders, base).items()}
    total_rate = sum(rates.values())
    target, h = cfg.target_tokens_per_replica_s, cfg.hysteresis
    want: dict[Key, int] = {}
    why: dict[Key, str] = {}
    cause: dict[Key, str] = {}
    for key, cur in holders.items():
        rate = rates.get(key, 0.0)
        floor, ceiling = max(cfg.min_replicas, base[key]), max(cfg.max_replicas, base[key])
        raw = math.ceil(rate / target)
        need = min(max(raw, floor), ceiling)
        last_change = max(last_up.get(key, -math.inf), last_down.get(key, -math.inf))
        if cur < floor:
            want[key], why[key], cause[key] = floor, f"below min_replicas={cfg.min_replicas}", "min_replicas"
        elif cur > ceiling:
            want[key], why[key], cause[key] = ceiling, f"above max_replicas={cfg.max_replicas}", "max_replicas"
        elif need > cur and total_rate >= cfg.min_rate and rate > target * cur * (1 + h) \
                and now - last_change >= cfg.upscale_cooldown_s:
            want[key], cause[key] = need, "rate"
            why[key] = (f"{rate:.1f} tok/s over {cur} holder(s) > target {target:g} tok/s per holder x {1 + h:g}"
                        + (f"; max_replicas={cfg.max_replicas} caps it at {need}" if raw > need else ""))
        elif need < cur and rate < target * (cur - 1) * (1 - h) and now - last_change >= cfg.downscale_cooldown_s:
            want[key], cause[key] = need, "rate" if rate > 0 else "no_load"
            why[key] = (f"no load: back to {need}" if rate <= 0 else
                        f"{rate:.1f} tok/s fits {need} holder(s): below the {target * (cur - 1) * (1 - h):.0f} tok/s "
                        f"that {cur - 1} holder(s) carry at the target less hysteresis {h:g}")
    final = _within_budget(cfg, rates, holders, want, base, now, last_up, why, cause)
    return {k: Wanted(n, why[k], cause[k]) for k, n in final.items()}


def _within_budget(cfg: AutoscalingConfig, rates: Mapping[Key, float], holders: Mapping[Key, int],
                   want: dict[Key, int], base: Mapping[Key, int], now: float = math.inf,
                   last_up: Mapping[Key, float] | None = None, why: dict[Key, str] | None = None,
                   cause: dict[Key, str] | None = None) -> dict[Key, int]:
    """Cut extra replicas (holders beyond the base copies) to `max_total_replicas`, one at a time, always the holder
    that carries the least load (rate / holders). A running holder counts its load x (1 + hysteresis) and one added
    less than `downscale_cooldown_s` ago is not cut at all, unless the budget was lowered below what runs (then the
    least loaded go, whatever their age). `why` gets the reason of every change the cap causes."""
    why = why if why is not None else {}
    cause = cause if cause is not None else {}
    last_up = last_up or {}
    final = {**holders, **want}
    cap = cfg.max_total_replicas
    over = sum(n - base[k] for k, n in final.items()) - cap
    lowered = sum(n - base[k] for k, n in holders.items()) > cap

    def value(k: Key) -> float:
        load = rates.get(k, 0.0) / final[k]  # what the holder that would go carries
        if final[k] > holders[k] or lowered:
            return load
        if now - last_up.get(k, -math.inf) < cfg.downscale_cooldown_s:
            return math.inf  # added recently: cooldown
        return load * (1 + cfg.hysteresis)

    cut: list[tuple[Key, float]] = []
    while over > 0:
        key = min((k for k, n in final.items() if n > base[k]), key=lambda k: (value(k), k))
        cut.append((key, rates.get(key, 0.0) / final[key]))
        final[key] -= 1
        over -= 1
    out = {k: n for k, n in final.items() if n != holders[k]}
    grown = sorted((k for k in out if out[k] > holders[k]), key=lambda k: -rates.get(k, 0.0) / out[k])
    for key, load in cut:
        if key in out and out[key] > holders[key] and out[key] < want.get(key, 0):
            why[key] = f"{why.get(key, '')}; max_total_replicas={cap} binds: {out[key]} of the {want[key]} wanted"
            cause[key] = "cap"
        elif key in out and out[key] < holders[key] and lowered:
            why[key] = (f"max_total_replicas={cap} is below the {sum(n - base[k] for k, n in holders.items())} "
                        f"extra replicas running: the holder carrying least load goes ({load:.1f} tok/s)")
            cause[key] = "budget_lowered"
        elif key in out and out[key] < holders[key]:
            winner = grown[0] if grown else None
            beat = (f" for layer {winner[0]} expert {winner[1]} ({rates.get(winner, 0.0) / out[winner]:.1f} tok/s per "
                    f"holder)" if winner else "")
            why[key] = (f"swapped out{beat}: max_total_replicas={cap} binds and this holder carries {load:.1f} tok/s, "
                        f"less than the newcomer by more than hysteresis {cfg.hysteresis:g}")
            cause[key] = "swap"
    return out


def _rebalance(cfg: AutoscalingConfig, rates: Mapping[Key, float], holders: Mapping[Key, int],
               base: Mapping[Key, int]) -> dict[Key, int]:
    """Water-fill `max_total_replicas` extra holders over all experts by load per holder (capped at max_replicas,
    never below the base copies); returned only if it lowers the busiest holder's load by `rebalance_min_gain`, or
    when the budget was lowered below what is running (then always)."""
    keys = sorted(holders)
    if not keys:
        return {}
    cur = np.array([holders[k] for k in keys])
    floor = np.array([max(base[k], cfg.min_replicas) for k in keys])
    over_budget = (cur - floor).sum() > cfg.max_total_replicas  # the budget was lowered: comply whatever the load
    idle = sum(rates.get(k, 0.0) for k in keys) < cfg.min_rate
    if idle and not over_budget:
        return {}
    w = np.array([[max(rates.get(k, 0.0), 1e-9) for k in keys]])
    counts = water_fill(w, np.array([int(floor.sum()) + cfg.max_total_replicas]))[0]
    counts = np.maximum(np.minimum(counts, np.maximum(cfg.max_replicas, floor)), floor)
    if idle:  # no evidence of load: only take the surplus away, keep what fits the budget as it is
        return _within_budget(cfg, rates, holders, {}, base)
    if not over_budget and (w[0] / counts).max() > (1 - cfg.rebalance_min_gain) * (w[0] / cur).max():
        return {}
    return {k: int(c) for k, c, h in zip(keys, counts, cur) if c != h}


# ---- which replica actor holds what ----------------------------------------------------------------------------------
@dataclass
class ReplicaActor:
    """One replica process: the replicas whose weights it loaded (`held`), those in the map (`active`)."""

    name: str
    held: frozenset[Key]
    address: str = ""
    active: set[Key] = field(default_factory=set)

    def assignment(self, keys) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, e in sorted(keys):
            out.setdefault(layer, []).append(e)
        return out


def change_replicas(actors: Sequence[ReplicaActor], want_extra: Mapping[Key, int], per_actor: int,
                    rates: Mapping[Key, float]) -> tuple[dict[str, set[Key]], list[list[Key]]]:
    """Extra replicas wanted per key -> (new active set per existing actor, replica sets of actors to start).

    Removals come from the actor with the fewest active replicas first (so whole actors empty and stop); additions
    re-enable weights an actor already holds, then fill new actors: heaviest first, each to the new actor with the
    least load that does not hold the key yet (longest-processing-time packing)."""
    active = {a.name: set(a.active) for a in actors}
    held = {a.name: a.held for a in actors}
    have = Counter(k for keys in active.values() for k in keys)
    adds: list[Key] = []
    for key in sorted(set(have) | set(want_extra)):
        delta = want_extra.get(key, have[key]) - have[key]
        for _ in range(-delta):
            name = min((n for n, keys in active.items() if key in keys), key=lambda n: (len(active[n]), n))
            active[name].discard(key)
        for _ in range(delta):
            spare = [n for n in active if key in held[n] and key not in active[n]]
            if spare:
                active[max(spare, key=lambda n: (len(active[n]), n))].add(key)
            else:
                adds.append(key)
    new: list[list[Key]] = []
    load: list[float] = []
    for key in sorted(adds, key=lambda k: -rates.get(k, 0.0)):
        fits = [i for i, keys in enumerate(new) if len(keys) < per_actor and key not in keys]
        if fits:
            i = min(fits, key=lambda i: load[i])
        else:
            new.append([])
            load.append(0.0)
            i = len(new) - 1
        new[i].append(key)
        load[i] += rates.get(key, 0.0)
    return active, new

