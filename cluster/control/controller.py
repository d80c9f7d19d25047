"""The expert controller: measures expert load, decides how many replicas each expert has, and changes the set of
expert processes live without failing a request.

Two kinds of expert processes (docs/autoscaling.md):
- **base shards** (the deployment's `expert-shard-{i}`): every expert at least once; never stopped by the controller,
  so a map with base shards only is always correct (a restarted attention worker starts with it);
- **replica actors** (this controller's `replica-{n}`): extra copies of hot experts, each holding up to
  `experts_per_actor` (layer, expert) replicas, loaded from the checkpoint when started.

Every tick the controller (1) reads each attention worker's cumulative tokens per expert and turns them into rates
over `window_s`; (2) asks the policy for the wanted number of holders per expert: `autoscale` mode sizes each expert
by `target_tokens_per_replica_s`, `rebalance` mode spreads a fixed budget of replica slots by water-filling (the
planner's step 1: each slot to the expert with the most load per replica); (3) applies the difference make-before-
break: start replica actors and wait until their weights are loaded and they listen, install map version v+1 in every
attention worker (atomically per worker: a step keeps the map it started with), wait until no worker has a dispatch
under way with an older version, then close the channels to replicas no longer in the map and stop them. A replica
actor that dies is dropped from the map (its tokens went to the other holders meanwhile: docs/reliability.md).

`ExpertController` is plain asyncio over a `ReplicaBackend` (start/stop replica processes) and `WorkerPort`s (the
attention workers' map RPCs); cluster/serve/controller.py gives it Ray actors and Serve handles.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from moemesh.cluster.control.effect import Effect, EffectTracker, LatencyMeter
from moemesh.cluster.control.policy import (AutoscalingConfig, Decision, Key, LoadMeter, ReplicaActor,
                                            Wanted, change_replicas, decide_holders)

log = logging.getLogger("moemesh.controller")


def log_decisions(stream=None) -> logging.Logger:
    """Send the controller's INFO lines (every decision with its reason, replica starts) to `stream` (default
    stderr). Inside a Ray Serve replica nothing sets this logger's level, so INFO would be dropped; there, stderr
    reaches the replica's log file and the driver's output (`moemesh serve`). Idempotent."""
    log.setLevel(logging.INFO)
    if not any(getattr(h, "moemesh_decisions", False) for h in log.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.moemesh_decisions = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False  # a root handler would print the same line twice
    return log


# ---- the controller --------------------------------------------------------------------------------------------------
class ReplicaBackend(Protocol):
    """Starts and stops replica processes (cluster/serve/controller.py: Ray actors)."""

    async def start(self, name: str, assignment: dict[int, list[int]], version: int) -> str: ...  # -> address
    async def stop(self, name: str) -> None: ...
    async def alive(self, name: str) -> bool: ...
    def pending(self) -> int: ...  # started but not yet listening (waiting for a node, or loading)


class WorkerPort(Protocol):
    """One attention worker's map RPCs (actors/attention/worker.py)."""

    async def expert_loads(self) -> dict[str, int]: ...
    async def expert_map_state(self) -> dict: ...
    async def install_expert_map(self, version: int, replicas: dict, addresses: dict) -> int: ...
    async def release_shards(self, names: list[str]) -> list[str]: ...
    async def dispatch_latency(self) -> dict[str, list[float]]: ...  # shard -> [messages, seconds], cumulative


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.replicas = Gauge("moemesh:expert_replicas", "Holders of each expert (base copy included).",
                              ["layer", "expert"], registry=registry)
        self.rate = Gauge("moemesh:expert_token_rate", "Tokens per second routed to each expert (trailing window).",
                          ["layer", "expert"], registry=registry)
        self.decisions = PromCounter("moemesh:autoscaler_decisions", "Holder-count changes applied, by action and "
                                     "cause.", ["action", "cause"], registry=registry)
        self.pending = Gauge("moemesh:autoscaler_pending_replicas", "Replica actors started but not yet serving "
                             "(waiting for resources or loading weights).", registry=registry)
        self.version = Gauge("moemesh:expert_map_version", "Expert map version installed by the controller.",
                             registry=registry)
        self.actors = Gauge("moemesh:replica_actors", "Replica actors serving.", registry=registry)
        self.effect_rate = Gauge("moemesh:replica_effect_tokens_per_holder", "Tokens/s per holder of an expert "
                                 "whose holders changed, before the change and a window after it.",
                                 ["layer", "expert", "phase"], registry=registry)
        self.effect_latency = Gauge("moemesh:replica_effect_dispatch_latency_seconds", "Mean dispatch round trip "
                                    "to the holders of an expert whose holders changed, before and after.",
                                    ["layer", "expert", "phase"], registry=registry)
        self.failures = PromCounter("moemesh:autoscaler_failures", "Changes abandoned (a replica did not start in "
                                    "time) or steps that raised.", registry=registry)


class ExpertController:
    """See the module docstring. `base`: the base shards' {layer: expert ids}; `workers`: name -> WorkerPort."""

    def __init__(self, cfg: AutoscalingConfig, base: Sequence[Mapping[int, Sequence[int]]], n_experts: int,
                 workers: Mapping[str, WorkerPort], backend: ReplicaBackend, registry: CollectorRegistry | None = None,
                 clock=time.monotonic):
        self.cfg, self.workers, self.backend, self.clock = cfg, dict(workers), backend, clock
        self.base = Counter((int(layer), int(e)) for held in base for layer, ids in held.items() for e in ids)
        self._base_shards: dict[Key, list[str]] = {}  # key -> base shard positions (as the workers name them)
        for i, held in enumerate(base):
            for layer, ids in held.items():
                for e in ids:
                    self._base_shards.setdefault((int(layer), int(e)), []).append(str(i))
        layers = sorted({layer for layer, _ in self.base})
        missing = [(layer, e) for layer in layers for e in range(n_experts) if not self.base[(layer, e)]]
        if missing:
            raise ValueError(f"base: experts {missing[:8]} are held by no base shard")
        self.meter = LoadMeter(cfg.window_s)
        self.latency = LatencyMeter(cfg.window_s)
        self.effects = EffectTracker()
        self.actors: dict[str, ReplicaActor] = {}
        self.version = 0
        self.decisions: deque[Decision] = deque(maxlen=1000)
        self._last_up: dict[Key, float] = {}
        self._last_down: dict[Key, float] = {}
        self._names = 0
        self._run_id = secrets.token_hex(3)  # replica names are unique across controller restarts
        self._seen: dict[str, dict] = {}  # worker -> what the last tick read (None: unreachable)
        self.pool: dict[str, tuple[float, dict]] = {}  # autoscaled attention replica -> (last report, map state)
        self._pool_loads: dict[str, dict[Key, int]] = {}
        self._pool_latency: dict[str, dict[str, list[float]]] = {}
        self._lock = asyncio.Lock()
        self.metrics = ControllerMetrics(registry or CollectorRegistry())

    # -- state --------------------------------------------------------------------------------------------------------
    def holders(self) -> dict[Key, int]:
        extra = Counter(k for a in self.actors.values() for k in a.active)
        return {k: n + extra[k] for k, n in self.base.items()}

    def replicas(self) -> dict[str, dict[int, list[int]]]:
        """{replica actor: {layer: expert ids}} of the map in force (actors with nothing active left out)."""
        return {a.name: a.assignment(a.active) for a in self.actors.values() if a.active}

    def _map_in_force(self) -> tuple[dict[str, dict[int, list[int]]], dict[str, str]]:
        """(`replicas()`, {replica actor: its address}): what a worker installs."""
        replicas = self.replicas()
        return replicas, {n: self.actors[n].address for n in replicas}

    def pool_sync(self, name: str, state: dict, loads: Mapping[str, int],
                  latency: Mapping[str, list[float]] | None = None) -> dict:
        """An autoscaled attention replica reports its map state, cumulative expert loads and dispatch latency
        (`WorkerPort.dispatch_latency`) and gets the map in force back ({version, replicas, addresses}); it installs
        it itself (docs/serving.md). Synchronous, so the answer is one consistent map."""
        self.pool[name] = (self.clock(), dict(state))
        self._pool_loads[name] = {_key(k): int(v) for k, v in loads.items()}
        self._pool_latency[name] = dict(latency or {})
        replicas, addresses = self._map_in_force()
        return {"version": self.version, "replicas": replicas, "addresses": addresses}

    def _live_pool(self) -> dict[str, dict]:
        """Pool replicas heard from within `pool_ttl_s` (the others are forgotten)."""
        now = self.clock()
        for name in [n for n, (t, _) in self.pool.items() if now - t > self.cfg.pool_ttl_s]:
            del self.pool[name]
            self._pool_loads.pop(name, None)
            self._pool_latency.pop(name, None)
        return {n: st for n, (_, st) in self.pool.items()}

    def configure(self, **changes) -> AutoscalingConfig:
        """Change policy fields live (validated like the config file); the next tick uses them."""
        self.cfg = AutoscalingConfig.model_validate({**self.cfg.model_dump(), **changes})
        return self.cfg

    def state(self) -> dict:
        top = sorted(self.meter.rates().items(), key=lambda kv: -kv[1])[:20]
        return {"version": self.version, "replicas": self.replicas(), "pending": self.backend.pending(),
                "rates": {f"{layer}/{e}": round(r, 2) for (layer, e), r in top}, "workers": self._seen,
                "holders": {f"{layer}/{e}": n for (layer, e), n in self.holders().items() if n > 1},
                "decisions": [asdict(d) for d in list(self.decisions)[-50:]],
                "effects": [asdict(e) for _, e in sorted(self.effects.current.values(), key=lambda te: te[0])][-20:]}

    # -- the loop -----------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Tick every `interval_s` until cancelled; a failing tick is logged and counted, never fatal."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the controller must outlive a bad tick (a worker restarting, ...)
                log.exception("expert controller tick failed")
                self.metrics.failures.inc()
            await asyncio.sleep(self.cfg.interval_s)

    async def tick(self) -> list[Decision]:
        """Measure, decide, apply; re-send the map to workers that lost it (restarted). -> decisions applied."""
        async with self._lock:
            now = self.clock()
            states = await self._gather({n: w.expert_map_state() for n, w in self.workers.items()})
            pool = self._live_pool()
            if self.version == 0 and (states or pool):  # a restarted controller continues the workers' numbering
                self.version = max(s["version"] for s in [*states.values(), *pool.values()])
            await self._forget_strangers(states)
            loads = await self._gather({n: w.expert_loads() for n, w in self.workers.items()})
            latency = await self._gather({n: w.dispatch_latency() for n, w in self.workers.items()})
            self.latency.add(now, {**latency, **self._pool_latency})
            self._seen = {n: {"version": states[n]["version"] if n in states else None,
                              "tokens": sum(loads[n].values()) if n in loads else None} for n in self.workers}
            self.meter.add(now, {**{n: {_key(k): v for k, v in c.items()} for n, c in loads.items()},
                                 **self._pool_loads})  # each pool replica counts as one more worker
            rates = self.meter.rates()
            await self._drop_dead()
            holders = self.holders()
            decided = decide_holders(self.cfg, rates, holders, now, self._last_up, self._last_down, self.base)
            decisions = await self._apply(decided, rates, holders, now) if decided else []
            self._settle_effects(rates)
            stale = [n for n, s in states.items() if s["version"] < self.version]
            if stale and not decisions:
                await self._install(only=stale)
            self._export(rates)
            return decisions

    async def _apply(self, decided: dict[Key, Wanted], rates: dict[Key, float], holders: dict[Key, int],
                     now: float) -> list[Decision]:
        latency_before = {k: self.latency.mean_s(self._holder_shards(k)) for k in decided}
        want_extra = {k: w.holders - self.base[k] for k, w in decided.items()}
        active, new_sets = change_replicas(list(self.actors.values()), want_extra, self.cfg.experts_per_actor,
                                           rates)
        version = self.version + 1
        started = await self._start(new_sets, version)
        if started is None:
            return []
        for name, keys in active.items():
            self.actors[name].active = keys
        self.actors.update({a.name: a for a in started})
        self.version = version
        await self._install()
        installed_at = self.clock()
        emptied = [a.name for a in self.actors.values() if not a.active]
        await self._drain_and_stop(emptied)
        after = self.holders()
        decisions = []
        for key in sorted(decided):
            if after[key] == holders[key]:
                continue
            grew = after[key] > holders[key]
            action = "rebalance" if self.cfg.mode == "rebalance" else ("add" if grew else "remove")
            reason, cause = decided[key].reason, decided[key].cause
            d = Decision(time.time(), action, key[0], key[1], holders[key], after[key], rates.get(key, 0.0), reason,
                         cause)
            (self._last_up if grew else self._last_down)[key] = now
            self._record_effect(key, d, latency_before[key], installed_at)
            self.decisions.append(d)
            self.metrics.decisions.labels(action, cause).inc()
            log.info("expert map v%d: layer %d expert %d %s %d -> %d holders (%s)", version, key[0], key[1],
                     action, holders[key], after[key], reason)
            decisions.append(d)
        return decisions

    # -- does it help? (cluster/control/effect.py) --------------------------------------------------------------------
    def _holder_shards(self, key: Key) -> list[str]:
        """The shards holding `key` in the map in force, named as the workers' dispatch counters name them."""
        return self._base_shards.get(key, []) + [a.name for a in self.actors.values() if key in a.active]

    def _record_effect(self, key: Key, d: Decision, latency_before: float | None, installed_at: float) -> None:
        effect = Effect(d.time, key[0], key[1], d.action, d.holders_from, d.holders_to,
                        d.rate / max(d.holders_from, 1), latency_before)
        self.effects.changed(key, effect, installed_at)
        self._export_effect(effect)

    def _settle_effects(self, rates: dict[Key, float]) -> None:
        since, holders = self.meter.since(), self.holders()
        for e in self.effects.settle(since, rates, holders, lambda k: self.latency.mean_s(self._holder_shards(k))):
            self._export_effect(e)
            log.info("layer %d expert %d %s %d -> %d holders: %s per holder, dispatch latency %s",
                     e.layer, e.expert, e.action, e.holders_before, e.holders_after,
                     _change(e.tokens_per_holder_before, e.tokens_per_holder_after, "%.1f tok/s", 1),
                     _change(e.latency_before_s, e.latency_after_s, "%.1f ms", 1e3))

    def _export_effect(self, e: Effect) -> None:
        phases = {"before": (e.tokens_per_holder_before, e.latency_before_s),
                  "after": (e.tokens_per_holder_after, e.latency_after_s)}
        for phase, (rate, latency) in phases.items():
            for gauge, value in ((self.metrics.effect_rate, rate), (self.metrics.effect_latency, latency)):
                if value is not None:
                    gauge.labels(e.layer, e.expert, phase).set(value)
                else:  # not measured (yet): no stale value from an earlier change (absent labels are ignored)
                    gauge.remove(e.layer, e.expert, phase)

    async def _start(self, new_sets: list[list[Key]], version: int) -> list[ReplicaActor] | None:
        """Start replica actors and wait until all listen (None: one did not; the others are stopped again)."""
        actors = []
        for keys in new_sets:
            self._names += 1
            actors.append(ReplicaActor(f"replica-{self._run_id}-{self._names}", frozenset(keys), active=set(keys)))
        if not actors:
            return []
        starting = [asyncio.ensure_future(asyncio.wait_for(self.backend.start(a.name, a.assignment(a.held), version),
                                                           self.cfg.start_timeout_s)) for a in actors]
        left = len(starting)

        def served(_task) -> None:  # the pending gauge counts from the start until each serves (or fails)
            nonlocal left
            left -= 1
            self.metrics.pending.set(left)

        for task in starting:
            task.add_done_callback(served)
        self.metrics.pending.set(left)
        log.info("starting %d replica actor(s) for map v%d: %s", len(actors), version,
                 "; ".join(f"{a.name} {sorted(a.held)}" for a in actors))
        results = await asyncio.gather(*starting, return_exceptions=True)
        failed = [(a, r) for a, r in zip(actors, results) if isinstance(r, BaseException)]
        if failed:
            for a, err in failed:
                log.warning("replica actor %s did not start: %r; change abandoned", a.name, err)
            self.metrics.failures.inc()
            await asyncio.gather(*(self.backend.stop(a.name) for a in actors), return_exceptions=True)
            return None
        for a, address in zip(actors, results):
            a.address = address
        return actors

    async def _install(self, only: Sequence[str] | None = None) -> None:
        """Send the map in force to every worker (or `only` these); a worker that cannot be reached gets it at a
        later tick (it then routes by its older map, whose replicas are still running, or by the base shards)."""
        replicas, addresses = self._map_in_force()
        names = list(only) if only is not None else list(self.workers)
        await self._gather({n: self.workers[n].install_expert_map(self.version, replicas, addresses) for n in names})

    async def _drain_and_stop(self, names: list[str]) -> None:
        """Wait until no worker dispatches with a map older than the one in force, then stop `names`."""
        if not names:
            return
        loop = asyncio.get_running_loop()  # real time: a drain waits for real dispatches
        deadline = loop.time() + self.cfg.drain_timeout_s
        while loop.time() < deadline:
            states = await self._gather({n: w.expert_map_state() for n, w in self.workers.items()})
            reports = {**states, **self._live_pool()}  # pool replicas report every couple of seconds
            old = {n: s for n, s in reports.items() if s["version"] < self.version
                   or any(v < self.version for v in s["in_use"])}
            if not old:
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("drain: workers still used an old map after %gs; stopping %s anyway",
                        self.cfg.drain_timeout_s, names)
        await self._gather({n: w.release_shards(names) for n, w in self.workers.items()})
        await asyncio.gather(*(self.backend.stop(n) for n in names), return_exceptions=True)
        for n in names:
            self.actors.pop(n, None)

    async def _forget_strangers(self, states: dict[str, dict]) -> None:
        """Replicas in workers' maps that this controller did not start (its previous life's, which died with it):
        a new map version without them, then their channels are released."""
        strangers = sorted({n for s in states.values() for n in s["shards"] if n not in self.actors})
        if not strangers:
            return
        log.warning("workers route to replicas %s that this controller does not own; dropping them", strangers)
        self.version += 1
        await self._install()
        await self._gather({n: w.release_shards(strangers) for n, w in self.workers.items()})

    async def _drop_dead(self) -> None:
        """Replica actors that died leave the map (a new version); their experts keep their other holders."""
        alive = await asyncio.gather(*(self.backend.alive(n) for n in self.actors), return_exceptions=True)
        dead = [n for n, ok in zip(list(self.actors), alive) if ok is not True]
        if not dead:
            return
        log.warning("replica actors %s died; dropping them from the expert map", dead)
        for n in dead:
            self.actors[n].active = set()
        self.version += 1
        await self._install()
        await self._drain_and_stop(dead)

    async def _gather(self, calls: dict) -> dict:
        """Await each call; drop (and log) the ones that failed."""
        names = list(calls)
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        out = {}
        for n, r in zip(names, results):
            if isinstance(r, BaseException):
                log.warning("worker %s: %r", n, r)
            else:
                out[n] = r
        return out

    def _export(self, rates: dict[Key, float]) -> None:
        m = self.metrics
        for (layer, e), n in self.holders().items():
            m.replicas.labels(layer, e).set(n)
            m.rate.labels(layer, e).set(rates.get((layer, e), 0.0))
        m.pending.set(self.backend.pending())
        m.version.set(self.version)
        m.actors.set(len(self.actors))


def _change(before: float | None, after: float | None, fmt: str, scale: float) -> str:
    show = [("n/a" if v is None else fmt % (v * scale)) for v in (before, after)]
    return f"{show[0]} -> {show[1]}"


def _key(text: str) -> Key:
    layer, expert = text.split("/")
    return int(layer), int(expert)
