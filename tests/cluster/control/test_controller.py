"""The expert controller's policy (worked by hand), its replica bookkeeping, and its make-before-break order.

The order test drives `ExpertController` with recording stand-ins for the Ray backend and the workers (a unit test
of the controller's sequencing); the real thing, with Ray actors and attention workers under HTTP load, is in
tests/cluster/control/test_autoscaling.py.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from moemesh.cluster.control.controller import ExpertController
from moemesh.cluster.control.policy import (AutoscalingConfig, LoadMeter, ReplicaActor, change_replicas,
                                            decide_holders, wanted_holders)

CFG = AutoscalingConfig(target_tokens_per_replica_s=100, hysteresis=0.2, max_replicas=4, max_total_replicas=16,
                        upscale_cooldown_s=10, downscale_cooldown_s=60, min_rate=1)
NEVER: dict = {}


def test_a_hot_expert_grows_to_its_rate_over_the_target_capped_at_max_replicas():
    # 350 tok/s > 100 x 1 x 1.2: grow to ceil(350/100) = 4; 130 > 120: grow to 2; 110 < 120 (hysteresis): stay
    want = wanted_holders(CFG, {(0, 0): 350.0, (0, 1): 130.0, (0, 2): 110.0}, {(0, e): 1 for e in range(3)},
                          now=100, last_up=NEVER, last_down=NEVER)
    assert want == {(0, 0): 4, (0, 1): 2}
    capped = wanted_holders(CFG, {(0, 0): 900.0}, {(0, 0): 1}, now=100, last_up=NEVER, last_down=NEVER)
    assert capped == {(0, 0): 4}


def test_cooldowns_hold_changes_back():
    hot, cold = {(0, 0): 350.0}, {(0, 0): 50.0}
    assert wanted_holders(CFG, hot, {(0, 0): 2}, now=100, last_up={(0, 0): 95}, last_down=NEVER) == {}
    assert wanted_holders(CFG, hot, {(0, 0): 2}, now=100, last_up={(0, 0): 89}, last_down=NEVER) == {(0, 0): 4}
    # shrinking waits downscale_cooldown_s after the last growth too
    assert wanted_holders(CFG, cold, {(0, 0): 3}, now=100, last_up={(0, 0): 50}, last_down=NEVER) == {}
    assert wanted_holders(CFG, cold, {(0, 0): 3}, now=111, last_up={(0, 0): 50}, last_down=NEVER) == {(0, 0): 1}


def test_shrinking_has_hysteresis():
    # 3 holders: one fewer (2) would carry 200 tok/s at target; shrink only below 200 x 0.8 = 160
    assert wanted_holders(CFG, {(0, 0): 170.0}, {(0, 0): 3}, now=1000, last_up=NEVER, last_down=NEVER) == {}
    assert wanted_holders(CFG, {(0, 0): 150.0}, {(0, 0): 3}, now=1000, last_up=NEVER, last_down=NEVER) == \
        {(0, 0): 2}
    # no load at all: back to min_replicas
    assert wanted_holders(CFG, {}, {(0, 0): 3}, now=1000, last_up=NEVER, last_down=NEVER) == {(0, 0): 1}


def test_the_total_budget_goes_to_the_most_load_per_holder():
    # A wants 4 (400 tok/s), B wants 2 (150 tok/s): 4 extras > budget 2. Worked by hand: {A: 3, B: 1} has busiest
    # holder 150 tok/s (B), {A: 2, B: 2} 200 (A): the slots both go to A.
    cfg = CFG.model_copy(update={"max_total_replicas": 2})
    want = wanted_holders(cfg, {(0, 0): 400.0, (0, 1): 150.0}, {(0, 0): 1, (0, 1): 1}, now=100, last_up=NEVER,
                          last_down=NEVER)
    assert want == {(0, 0): 3}


def test_rebalance_water_fills_a_fixed_budget():
    cfg = CFG.model_copy(update={"mode": "rebalance", "max_total_replicas": 2})
    rates = {(0, 0): 300.0, (0, 1): 100.0, (0, 2): 100.0, (0, 3): 100.0}
    ones = {k: 1 for k in rates}
    # 6 slots over loads 300/100/100/100: A gets 3 (100 per holder), the busiest holder drops from 300 to 100
    assert wanted_holders(cfg, rates, ones, now=0, last_up=NEVER, last_down=NEVER) == {(0, 0): 3}
    # the load moved to expert 3: its replicas come from A
    moved = {(0, 0): 100.0, (0, 1): 100.0, (0, 2): 100.0, (0, 3): 300.0}
    assert wanted_holders(cfg, moved, {**ones, (0, 0): 3}, now=0, last_up=NEVER, last_down=NEVER) == \
        {(0, 0): 1, (0, 3): 3}
    # already balanced: nothing to gain
    assert wanted_holders(cfg, rates, {**ones, (0, 0): 3}, now=0, last_up=NEVER, last_down=NEVER) == {}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalingConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError, match="target_tokens_per_replica_s"):
        AutoscalingConfig(target_tokens_per_replica_s=0)


def test_load_meter_rates_over_the_window_and_survives_a_worker_restart():
    m = LoadMeter(window_s=10)
    m.add(0, {"w0": {(0, 1): 100}, "w1": {(0, 1): 50}})
    m.add(5, {"w0": {(0, 1): 600}, "w1": {(0, 1): 50}})
    assert m.rates() == pytest.approx({(0, 1): 100.0})  # 500 tokens in 5 s
    m.add(10, {"w0": {(0, 1): 1100}, "w1": {(0, 1): 20}})  # w1 restarted: its 20 are new tokens
    assert m.rates() == pytest.approx({(0, 1): (500 + 500 + 20) / 10})


def _actor(name, held, active=None):
    return ReplicaActor(name, frozenset(held), f"{name}:1", set(held if active is None else active))


def test_change_replicas_empties_small_actors_first_reuses_weights_then_packs_new_actors():
    a = _actor("a", [(0, 0), (0, 1)])
    b = _actor("b", [(0, 0)])
    c = _actor("c", [(0, 2), (0, 3)], active=[(0, 2)])  # holds (0, 3)'s weights, not in the map
    want = {(0, 0): 1, (0, 3): 1, (0, 4): 2, (0, 5): 1}
    rates = {(0, 4): 50.0, (0, 5): 10.0}
    active, new = change_replicas([a, b, c], want, per_actor=2, rates=rates)
    assert active["b"] == set()                      # (0, 0): 2 -> 1, taken from the actor with fewer replicas
    assert active["a"] == {(0, 0), (0, 1)}           # (0, 1) not mentioned: kept
    assert active["c"] == {(0, 2), (0, 3)}           # (0, 3) re-enabled from weights c already holds
    assert sorted(map(sorted, new)) == [[(0, 4)], [(0, 4), (0, 5)]]  # one key at most once per actor, <= 2 each


class _Backend:
    def __init__(self, log):
        self.log, self.live = log, set()

    async def start(self, name, assignment, version):
        await asyncio.sleep(0.01)  # time under test: a start takes a while (an install not waiting for it comes first)
        self.log.append(("started", name, version))
        self.live.add(name)
        return f"{name}:1"

    async def stop(self, name):
        self.log.append(("stopped", name))
        self.live.discard(name)

    async def alive(self, name):
        return name in self.live

    def pending(self):
        return 0


class _Worker:
    def __init__(self, name, log, loads, latency=None):
        self.name, self.log, self.loads = name, log, loads
        self.latency = latency if latency is not None else {}  # shard -> [messages, seconds], cumulative
        self.version, self.in_use, self.replicas = 0, [], {}
        self.reported: list[dict] = []  # every expert_map_state answer, in order

    async def expert_loads(self):
        return dict(self.loads)

    async def dispatch_latency(self):
        return {s: list(v) for s, v in self.latency.items()}

    async def expert_map_state(self):
        self.reported.append({"version": self.version, "in_use": list(self.in_use), "shards": list(self.replicas)})
        return dict(self.reported[-1])

    async def install_expert_map(self, version, replicas, addresses):
        if version > self.version:
            self.log.append(("install", self.name, version, sorted(replicas)))
            self.version, self.replicas = version, dict(replicas)
        return self.version

    async def release_shards(self, names):
        self.log.append(("release", self.name, sorted(names)))
        return names


def test_controller_starts_replicas_before_the_map_names_them_and_stops_them_only_after_drain():
    log, clock = [], [0.0]
    loads = {"0/0": 0}
    workers = {f"w{k}": _Worker(f"w{k}", log, loads) for k in range(2)}
    backend = _Backend(log)
    cfg = CFG.model_copy(update={"upscale_cooldown_s": 0, "downscale_cooldown_s": 0, "window_s": 100})
    ctl = ExpertController(cfg, [{0: [0, 1]}], 2, workers, backend, clock=lambda: clock[0])

    async def main():
        await ctl.tick()
        clock[0], loads["0/0"] = 10.0, 3500  # 350 tok/s on expert 0
        grown = await ctl.tick()
        assert [(d.action, d.holders_from, d.holders_to) for d in grown] == [("add", 1, 4)]
        assert ctl.holders()[(0, 0)] == 4 and log[0][0] == "started"
        first_install = next(i for i, e in enumerate(log) if e[0] == "install")
        assert all(e[0] == "started" for e in log[:first_install])  # make before break
        assert {w.version for w in workers.values()} == {1}

        # a worker that restarts (version 0) gets the map again at the next tick
        workers["w1"].version, workers["w1"].replicas = 0, {}
        await ctl.tick()
        assert workers["w1"].version == 1 and workers["w1"].replicas == workers["w0"].replicas

        # load stops; w0 still has a step under way with map 1 when the controller shrinks: no stop until it ends
        workers["w0"].in_use = [1]
        clock[0] += 200.0  # no new tokens for 200 s
        shrink = asyncio.create_task(ctl.tick())

        def drain_polls() -> int:  # w0 reported map 2 installed, a step under map 1 still under way
            return sum(1 for r in workers["w0"].reported if r["version"] == 2 and r["in_use"] == [1])
        # the second such poll comes after the controller decided on the first (or a stop came without waiting)
        for _ in range(1000):
            if drain_polls() >= 2 or any(e[0] == "stopped" for e in log) or shrink.done():
                break
            await asyncio.sleep(0.01)
        assert not any(e[0] == "stopped" for e in log) and workers["w0"].version == 2 and drain_polls() >= 2
        workers["w0"].in_use = []
        shrunk = await shrink
        assert [(d.action, d.holders_to) for d in shrunk] == [("remove", 1)]
        stops = [i for i, e in enumerate(log) if e[0] == "stopped"]
        releases = [i for i, e in enumerate(log) if e[0] == "release"]
        assert stops and max(releases) < min(stops)
        assert ctl.actors == {} and backend.live == set()

    asyncio.run(main())


def test_a_dead_replica_actor_leaves_the_map_and_is_replaced():
    log, clock = [], [0.0]
    loads = {"0/0": 0}
    workers = {"w0": _Worker("w0", log, loads)}
    backend = _Backend(log)
    cfg = CFG.model_copy(update={"upscale_cooldown_s": 0, "downscale_cooldown_s": 1e9, "window_s": 100})
    ctl = ExpertController(cfg, [{0: [0, 1]}], 2, workers, backend, clock=lambda: clock[0])

    async def main():
        await ctl.tick()
        clock[0], loads["0/0"] = 10.0, 2500
        await ctl.tick()
        dead = set(workers["w0"].replicas)
        assert dead
        backend.live.clear()  # every replica actor died
        clock[0] = 11.0
        await ctl.tick()
        # the dead left the map; the load is still there, so new replicas took their place (started first)
        assert dead.isdisjoint(workers["w0"].replicas) and set(workers["w0"].replicas) <= backend.live
        assert ("release", "w0", sorted(dead)) in log

    asyncio.run(main())


def test_base_shards_must_cover_every_expert():
    with pytest.raises(ValueError, match=r"base: experts \[\(0, 1\)\]"):
        ExpertController(CFG, [{0: [0]}], 2, {}, _Backend([]))


def test_a_lowered_budget_removes_the_replicas_that_help_least():
    # extras: A has 2 (3 holders, 300 tok/s -> 100 per holder), B has 1 (2 holders, 60 tok/s -> 30 per holder).
    # Budget 1: B's extra goes first (30 < 100), then one of A's (A 3 -> 2 leaves 150 per holder).
    cfg = CFG.model_copy(update={"max_total_replicas": 1, "downscale_cooldown_s": 1e9, "hysteresis": 0.9})
    want = wanted_holders(cfg, {(0, 0): 300.0, (0, 1): 60.0}, {(0, 0): 3, (0, 1): 2}, now=0, last_up=NEVER,
                          last_down=NEVER)
    assert want == {(0, 0): 2, (0, 1): 1}


def test_experts_the_base_shards_hold_twice_never_shrink_below_that_and_cost_no_budget():
    base = {(0, 0): 2, (0, 1): 1}
    cfg = CFG.model_copy(update={"max_total_replicas": 1})
    # idle: (0, 0) stays at its 2 base copies (no negative extras); 500 tok/s on (0, 1): one extra within budget 1
    assert wanted_holders(cfg, {}, {(0, 0): 2, (0, 1): 1}, now=1e6, last_up=NEVER, last_down=NEVER, base=base) == {}
    assert wanted_holders(cfg, {(0, 1): 500.0}, {(0, 0): 2, (0, 1): 1}, now=0, last_up=NEVER, last_down=NEVER,
                          base=base) == {(0, 1): 2}
    reb = cfg.model_copy(update={"mode": "rebalance", "max_total_replicas": 0})
    assert wanted_holders(reb, {}, {(0, 0): 2, (0, 1): 2}, now=0, last_up=NEVER, last_down=NEVER, base=base) == \
        {(0, 1): 1}  # idle, but the budget was lowered below what runs: the extra goes, the base copies stay


def test_a_restarted_controller_drops_replicas_it_does_not_own_from_the_workers():
    log = []
    workers = {"w0": _Worker("w0", log, {})}
    workers["w0"].version, workers["w0"].replicas = 7, {"replica-old-1": {0: [0]}}  # the previous controller's
    ctl = ExpertController(CFG, [{0: [0, 1]}], 2, workers, _Backend(log), clock=lambda: 0.0)
    asyncio.run(ctl.tick())
    assert ctl.version == 8 and workers["w0"].version == 8 and workers["w0"].replicas == {}
    assert ("release", "w0", ["replica-old-1"]) in log


def test_pool_replicas_get_the_map_count_as_load_and_hold_back_a_drain():
    log, clock = [], [0.0]
    workers = {"w0": _Worker("w0", log, {})}
    cfg = CFG.model_copy(update={"upscale_cooldown_s": 0, "downscale_cooldown_s": 0, "window_s": 100,
                                 "pool_ttl_s": 30, "drain_timeout_s": 0.3})
    ctl = ExpertController(cfg, [{0: [0, 1]}], 2, workers, _Backend(log), clock=lambda: clock[0])

    async def main():
        await ctl.tick()
        first = ctl.pool_sync("pool#a", {"version": 0, "in_use": [], "shards": []}, {"0/1": 0})
        assert first == {"version": 0, "replicas": {}, "addresses": {}}
        clock[0] = 10.0
        ctl.pool_sync("pool#a", {"version": 0, "in_use": [], "shards": []}, {"0/1": 3000})  # only the pool works
        grown = await ctl.tick()
        assert [(d.layer, d.expert, d.action) for d in grown] == [(0, 1, "add")]
        answer = ctl.pool_sync("pool#a", {"version": 0, "in_use": [], "shards": []}, {"0/1": 3000})
        assert answer["version"] == ctl.version and answer["replicas"] and set(answer["addresses"]) == \
            set(answer["replicas"])
        # the pool replica still dispatches with map 0 when the replicas go: the drain waits for it (here, until
        # its timeout, since it never reports again), and a pool silent for pool_ttl_s is forgotten
        clock[0] = 300.0
        ctl.pool_sync("pool#a", {"version": 0, "in_use": [0], "shards": []}, {"0/1": 3000})
        started = asyncio.get_running_loop().time()
        await ctl.tick()
        assert asyncio.get_running_loop().time() - started >= 0.3
        clock[0] = 400.0
        assert ctl._live_pool() == {}

    asyncio.run(main())


# ---- stability under a binding cap (the policy alone, tick by tick, as the controller applies it) --------------------
def _simulate(cfg: AutoscalingConfig, rates_at, keys: list, ticks: int, every_s: float = 5.0):
    """Drive `decide_holders` as `ExpertController.tick` does (apply every change, stamp last_up / last_down) ->
    (holders per tick, [(tick, key, before, after, reason)])."""
    holders, last_up, last_down = {k: 1 for k in keys}, {}, {}
    history, changes = [], []
    for t in range(ticks):
        now = t * every_s
        for key, (n, reason, cause) in decide_holders(cfg, rates_at(t), holders, now, last_up, last_down).items():
            changes.append((t, key, holders[key], n, reason, cause))
            (last_up if n > holders[key] else last_down)[key] = now
            holders[key] = n
        assert sum(n - 1 for n in holders.values()) <= cfg.max_total_replicas
        history.append(dict(holders))
    return history, changes


CAPPED = AutoscalingConfig(target_tokens_per_replica_s=200, hysteresis=0.2, max_replicas=4, max_total_replicas=8,
                           upscale_cooldown_s=10, downscale_cooldown_s=60, min_rate=1)
KEYS = [(layer, e) for layer in range(2) for e in range(8)]


def _skewed(scale: float = 1.0) -> dict:
    """Zipf-like: a dozen experts each want more holders than the cap of 8 extras allows (the case that churned)."""
    return {k: scale * 2400.0 / (1 + i) ** 0.9 for i, k in enumerate(KEYS)}


def test_a_steady_load_above_the_cap_converges_and_stays():
    # steady as measured: each tick's rates within +-10% of the mean (a trailing window over real traffic). Before
    # the hysteresis at the cap, this flipped a holder back and forth on most ticks (52 changes in ticks 30-89).
    steady, noise = _skewed(), random.Random(0)
    wanted_extra = sum(min(math.ceil(r / 200), 4) - 1 for r in steady.values())
    assert wanted_extra > 2 * CAPPED.max_total_replicas  # the cap binds, hard
    measured = [{k: r * (1 + noise.uniform(-0.1, 0.1)) for k, r in steady.items()} for _ in range(90)]
    history, changes = _simulate(CAPPED, lambda t: measured[t], KEYS, ticks=90)
    settled = next(t for t in range(len(history)) if all(h == history[t] for h in history[t:]))
    late = [c for c in changes if c[0] >= 30]
    assert settled < 30 and len(late) <= 1, late  # converged within 30 ticks; at most one change in the 60 after
    assert sum(n - 1 for n in history[-1].values()) == CAPPED.max_total_replicas  # and the budget is used
    hottest = sorted(KEYS, key=lambda k: -steady[k])
    assert history[-1][hottest[0]] > 1 and history[-1][hottest[-1]] == 1  # the budget went to the hot experts


def test_a_slowly_drifting_load_changes_the_set_only_when_the_ranking_really_changes():
    # one cold expert heats up slowly (100 -> 1500 tok/s over 1,000 s) while the others stay: it gets holders only by
    # beating the least loaded running holder by more than the hysteresis (a swap), and nothing flips back
    steady, rising, noise = _skewed(), KEYS[-1], random.Random(1)
    jitter = [{k: 1 + noise.uniform(-0.1, 0.1) for k in KEYS} for _ in range(300)]  # measured, +-10%

    def drifting(t: int) -> dict:
        return {k: r * jitter[t][k] for k, r in {**steady, rising: 100.0 + 1400.0 * min(t / 200, 1.0)}.items()}

    history, changes = _simulate(CAPPED, drifting, KEYS, ticks=300)
    first = history[29]
    later = [c for c in changes if c[0] >= 30]
    swaps = [c for c in later if c[5] == "swap"]
    assert all("swapped out" in c[4] for c in swaps)
    assert swaps and all(k != rising for _, k, *_ in swaps)  # the ranking changed: holders made room for the riser
    for t, key, before, after, *_ in swaps:
        rates = drifting(t)
        assert rates[rising] / history[t][rising] > (1 + CAPPED.hysteresis) * rates[key] / before, (t, key)
    assert history[-1][rising] > 1
    for key in KEYS:  # no expert goes one way and back: each moves monotonically after the first 30 ticks
        counts = [first[key]] + [h[key] for h in history[30:]]
        steps = [b - a for a, b in zip(counts, counts[1:]) if b != a]
        assert all(x > 0 for x in steps) or all(x < 0 for x in steps), (key, counts)
    assert len(later) <= 2 * CAPPED.max_replicas, later  # a handful of changes over 270 ticks


def test_every_decision_says_why_in_words():
    cfg = CAPPED.model_copy(update={"max_total_replicas": 2})
    rates = {(0, 0): 900.0, (0, 1): 500.0, (0, 2): 10.0}
    got = decide_holders(cfg, rates, {k: 1 for k in rates}, now=100, last_up={}, last_down={})
    assert "900.0 tok/s over 1 holder(s) > target 200" in got[(0, 0)][1]
    assert "max_replicas=4 caps it at 4" in got[(0, 0)][1] and "max_total_replicas=2 binds" in got[(0, 0)][1]
    # a holder swapped out names the cap, the newcomer and the loads
    running = {(0, 0): 1, (0, 1): 3, (0, 2): 1}
    hot = {(0, 0): 2000.0, (0, 1): 300.0, (0, 2): 10.0}
    got = decide_holders(cfg, hot, running, now=1000, last_up={(0, 1): 0.0}, last_down={})
    assert got[(0, 1)].holders < 3 and "swapped out for layer 0 expert 0" in got[(0, 1)].reason
    assert (got[(0, 1)].cause, got[(0, 0)].cause) == ("swap", "cap")
    assert "max_total_replicas=2 binds" in got[(0, 1)][1]
    # a recently added holder is not swapped out (cooldown), a lowered budget names itself
    assert (0, 1) not in decide_holders(cfg, hot, running, now=30, last_up={(0, 1): 0.0}, last_down={})
    lowered = decide_holders(cfg.model_copy(update={"max_total_replicas": 0}), hot, running, now=30,
                             last_up={(0, 1): 0.0}, last_down={})
    assert lowered[(0, 1)][0] == 1 and "max_total_replicas=0 is below the 2 extra replicas running" in \
        lowered[(0, 1)][1]
    assert "min_replicas" in decide_holders(CAPPED, {}, {(0, 0): 0}, 0, {}, {})[(0, 0)][1]


def test_the_pending_gauge_counts_replicas_from_their_start_and_decisions_are_logged_at_info():
    """`moemesh:autoscaler_pending_replicas` reads the replicas being started while they load (not only after the
    tick), and every decision line (with its reason) reaches the controller's log at INFO."""
    import io

    from prometheus_client import CollectorRegistry

    from moemesh.cluster.control.controller import log_decisions

    class GatedBackend(_Backend):
        def __init__(self, log):
            super().__init__(log)
            self.release, self.started = asyncio.Event(), 0

        async def start(self, name, assignment, version):
            self.started += 1
            await self.release.wait()  # loading weights until the test lets it serve
            return await super().start(name, assignment, version)

    log, clock, loads = [], [0.0], {"0/0": 0}
    workers = {"w0": _Worker("w0", log, loads)}
    backend, registry = GatedBackend(log), CollectorRegistry()
    cfg = CFG.model_copy(update={"upscale_cooldown_s": 0, "window_s": 100, "experts_per_actor": 1})
    ctl = ExpertController(cfg, [{0: [0, 1]}], 2, workers, backend, registry, clock=lambda: clock[0])

    def pending() -> float:
        return registry.get_sample_value("moemesh:autoscaler_pending_replicas")

    async def main():
        await ctl.tick()
        clock[0], loads["0/0"] = 10.0, 3500  # 350 tok/s on expert 0: three more holders, one actor each
        tick = asyncio.create_task(ctl.tick())
        for _ in range(1000):
            if backend.started == 3:
                break
            await asyncio.sleep(0.001)
        assert backend.started == 3 and pending() == 3  # started, none serving yet: all three pending
        backend.release.set()
        decisions = await tick
        assert pending() == 0 and [(d.action, d.holders_to) for d in decisions] == [("add", 4)]

    stream = io.StringIO()
    logger = log_decisions(stream)
    try:
        asyncio.run(main())
    finally:  # leave the logger as other tests expect it
        for handler in [h for h in logger.handlers if getattr(h, "moemesh_decisions", False)]:
            logger.removeHandler(handler)
        logger.propagate, logger.level = True, 0
    lines = stream.getvalue()
    assert "INFO moemesh.controller: starting 3 replica actor(s) for map v1" in lines
    assert "layer 0 expert 0 add 1 -> 4 holders (350.0 tok/s over 1 holder(s) > target 100" in lines
