"""Does a replica help? The controller's before/after numbers for an expert whose holders it changed: tokens/s per
holder and the mean dispatch round trip to its holders, worked by hand from scripted worker counters."""

from __future__ import annotations

import asyncio
import io

import pytest
from prometheus_client import CollectorRegistry

from moemesh.cluster.control.controller import ExpertController, log_decisions
from moemesh.cluster.control.effect import LatencyMeter
from moemesh.cluster.control.policy import AutoscalingConfig


def test_latency_meter_weights_shards_by_messages_over_the_window_and_survives_a_restart():
    meter = LatencyMeter(window_s=10)
    meter.add(0, {"w0": {"0": [0, 0.0]}, "w1": {"0": [0, 0.0], "r": [0, 0.0]}})
    meter.add(10, {"w0": {"0": [10, 1.0]}, "w1": {"0": [30, 1.0], "r": [10, 0.1]}})
    assert meter.mean_s(["0"]) == pytest.approx(2.0 / 40)  # 40 messages, 2 s in all
    assert meter.mean_s(["0", "r"]) == pytest.approx(2.1 / 50)
    assert meter.mean_s(["nobody"]) is None
    meter.add(20, {"w0": {"0": [4, 0.8]}, "w1": {"0": [30, 1.0], "r": [10, 0.1]}})  # w0 restarted: all new
    assert meter.mean_s(["0"]) == pytest.approx(0.8 / 4)


class _Backend:
    """Replica actors that start at once and never die (this test is about measuring, not sequencing)."""

    async def start(self, name, assignment, version):
        return f"{name}:1"

    async def stop(self, name):
        pass

    async def alive(self, name):
        return True

    def pending(self):
        return 0


class _Worker:
    """Cumulative counters the test advances: tokens per expert and [messages, seconds] per shard."""

    def __init__(self):
        self.loads, self.latency, self.version = {"0/0": 0}, {"0": [0, 0.0]}, 0

    async def expert_loads(self):
        return dict(self.loads)

    async def dispatch_latency(self):
        return {s: list(v) for s, v in self.latency.items()}

    async def expert_map_state(self):
        return {"version": self.version, "in_use": [], "shards": []}

    async def install_expert_map(self, version, replicas, addresses):
        self.version = max(self.version, version)
        return self.version

    async def release_shards(self, names):
        return names

    def advance(self, tokens: int, per_shard: dict[str, tuple[int, float]]) -> None:
        self.loads["0/0"] += tokens
        for shard, (n, seconds) in per_shard.items():
            old = self.latency.get(shard, [0, 0.0])
            self.latency[shard] = [old[0] + n, old[1] + seconds]


def test_an_added_replica_reports_tokens_per_holder_and_dispatch_latency_before_and_after():
    cfg = AutoscalingConfig(target_tokens_per_replica_s=100, hysteresis=0.2, max_replicas=4, upscale_cooldown_s=0,
                            window_s=10, interval_s=5, min_rate=1)
    worker, clock, registry = _Worker(), [0.0], CollectorRegistry()
    ctl = ExpertController(cfg, [{0: [0, 1]}], 2, {"w0": worker}, _Backend(), registry, clock=lambda: clock[0])

    def gauge(name, phase):
        return registry.get_sample_value(name, {"layer": "0", "expert": "0", "phase": phase})

    async def main():
        await ctl.tick()
        clock[0] = 10.0
        worker.advance(3500, {"0": (100, 5.0)})  # 350 tok/s on expert 0, 50 ms per message to base shard 0
        [added] = await ctl.tick()
        assert (added.action, added.holders_from, added.holders_to) == ("add", 1, 4)
        [effect] = ctl.state()["effects"]
        assert effect["tokens_per_holder_before"] == pytest.approx(350.0)
        assert effect["latency_before_s"] == pytest.approx(0.05)
        assert effect["tokens_per_holder_after"] is None  # a whole window must pass under the new map first
        assert gauge("moemesh:replica_effect_dispatch_latency_seconds", "before") == pytest.approx(0.05)
        assert gauge("moemesh:replica_effect_tokens_per_holder", "after") is None

        replicas = sorted(ctl.actors)
        per_holder = {s: (25, 0.25) for s in ["0", *replicas]}  # 10 ms per message, 100 messages per 10 s
        for t in (20.0, 30.0):
            clock[0] = t
            worker.advance(3500, per_holder)
            assert await ctl.tick() == []  # the map stays as it is
            settled = ctl.state()["effects"][0]["tokens_per_holder_after"] is not None
            assert settled == (t >= 10.0 + 2 * cfg.window_s)  # the window [20, 30] is the first after the change
        [effect] = ctl.state()["effects"]
        assert effect["tokens_per_holder_after"] == pytest.approx(350.0 / 4)
        assert effect["latency_after_s"] == pytest.approx(0.01)  # only samples taken under the new map
        assert gauge("moemesh:replica_effect_tokens_per_holder", "after") == pytest.approx(87.5)
        assert gauge("moemesh:replica_effect_dispatch_latency_seconds", "after") == pytest.approx(0.01)

    stream = io.StringIO()
    logger = log_decisions(stream)
    try:
        asyncio.run(main())
    finally:
        logger.handlers = [h for h in logger.handlers if not getattr(h, "moemesh_decisions", False)]
    assert "350.0 tok/s -> 87.5 tok/s per holder, dispatch latency 50.0 ms -> 10.0 ms" in stream.getvalue()
