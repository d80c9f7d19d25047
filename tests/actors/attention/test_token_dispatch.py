"""Attention-worker dispatch: routing tokens to shards (once per destination), replicas, the combine, rerouting around
a shard that is down, and the map versions dispatches under way still use."""

from __future__ import annotations

import asyncio

import pytest
import torch

import moemesh
from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.experts.shard import ExpertShard
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.proto import errors
from moemesh.proto.transport import InProcessTransport

E = 16


def test_route_sends_each_token_once_per_destination_and_covers_every_slot():
    emap = ExpertMap.from_assignment([{3: list(range(0, 8))}, {3: list(range(8, 16))}], n_experts=E)
    indices = torch.tensor([[0, 1], [0, 9], [9, 10], [15, 2]])
    routes = emap.route(3, indices)
    assert routes[0][0].tolist() == [0, 1, 3] and routes[1][0].tolist() == [1, 2, 3]
    assert routes[0][1].tolist() == [[0, 1], [0, -1], [-1, 2]]
    assert routes[1][1].tolist() == [[-1, 9], [9, 10], [15, -1]]
    with pytest.raises(ValueError, match="layer"):
        emap.route(2, indices)


def test_replicated_expert_is_computed_exactly_once_per_slot():
    emap = ExpertMap.from_assignment([{1: list(range(E))}, {1: [5]}, {1: [5]}], n_experts=E)
    indices = torch.full((9, 2), 5)
    indices[:, 1] = 0
    routes = emap.route(1, indices)
    slots_for_5 = sum(int((ids == 5).sum()) for _, ids in routes.values())
    assert slots_for_5 == 9 and len(routes) == 3  # spread over the three replicas of expert 5
    assert sum(int((ids == 0).sum()) for _, ids in routes.values()) == 9
    with pytest.raises(ValueError, match="held by no shard"):
        ExpertMap.from_assignment([{1: [0]}], n_experts=2)


def test_route_avoids_down_shards_except_for_experts_only_they_hold():
    emap = ExpertMap.from_assignment([{1: [0, 1]}, {1: [0, 2]}, {1: [1, 2]}], n_experts=3)
    indices = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1]])
    routes = emap.route(1, indices, avoid=frozenset({0}))
    assert 0 not in routes  # experts 0 and 1 have other holders
    assert sum(int((ids >= 0).sum()) for _, ids in routes.values()) == 8  # every slot still goes somewhere
    only = ExpertMap.from_assignment([{1: [0]}, {1: [1]}], n_experts=2)
    assert set(only.route(1, torch.tensor([[0, 1]]), avoid=frozenset({0}))) == {0, 1}  # its tokens wait for it


LAYER = 2


def _layer_setup(tiny_model_dir, assignment):
    """(in-process shards of `assignment`, x [33, D], indices, weights, the full bank's answer) for layer LAYER."""
    model = moemesh.load_model(tiny_model_dir)
    cfg, ckpt = model.config, Checkpoint(tiny_model_dir)
    shards = {i: ExpertShard.from_loader(cfg, held, ckpt.read_experts) for i, held in enumerate(assignment)}
    x = torch.randn(33, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, indices = model.layers[LAYER].ffn.gate(x, torch.zeros(33, dtype=torch.long))
    return shards, x, indices, weights, model.layers[LAYER].ffn.experts(x, indices, weights)


def test_dispatch_over_shards_with_replicas_equals_the_full_bank(tiny_model_dir):
    cfg = moemesh.load_model(tiny_model_dir).config
    layer = LAYER
    assignment = [{layer: list(range(0, 16, 2))}, {layer: list(range(1, 16, 2))}, {layer: [0, 1, 2, 3]}]
    shards, x, indices, weights, want = _layer_setup(tiny_model_dir, assignment)
    dispatcher = Dispatcher(InProcessTransport(shards), ExpertMap.from_assignment(assignment, n_experts=E))
    got = asyncio.run(dispatcher(layer, x, indices, weights))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = dispatcher.stats
    assert sum(stats.tokens_per_expert.values()) == 33 * cfg.num_experts_per_tok
    assert set(stats.messages_to) <= {0, 1, 2} and sum(stats.messages_to.values()) == len(stats.messages_to)


class _Gated:
    """A shard that waits for `gate` before answering, and raises Unavailable while `down`. `arrived` is set each time
    a dispatch reaches it (the test clears it to wait for the next one)."""

    def __init__(self, shard, gate: asyncio.Event | None = None, down: bool = False):
        self.shard, self.gate, self.down, self.versions = shard, gate, down, []
        self.arrived = asyncio.Event()

    async def dispatch(self, batch):
        self.versions.append(batch.expert_map_version)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise errors.Unavailable("shard stopped")
        return await self.shard.dispatch(batch)


def test_tokens_of_an_unavailable_shard_are_sent_again_to_the_other_holders(tiny_model_dir):
    assignment = [{LAYER: list(range(0, 16, 2))}, {LAYER: list(range(1, 16, 2))}, {LAYER: list(range(E))}]
    shards, x, indices, weights, want = _layer_setup(tiny_model_dir, assignment)
    transport = InProcessTransport({0: _Gated(shards[0], down=True), 1: shards[1], 2: shards[2]})
    dispatcher = Dispatcher(transport, ExpertMap.from_assignment(assignment, n_experts=E))

    async def main():
        try:
            return await dispatcher(LAYER, x, indices, weights)
        finally:
            await dispatcher.health.close()

    torch.testing.assert_close(asyncio.run(main()), want, rtol=1e-5, atol=1e-6)
    assert dispatcher.health.down == {0}
    [incident] = dispatcher.health.events
    assert incident["shard"] == "0" and incident["how"] == "rerouted"


def test_versions_in_use_lists_the_maps_of_dispatches_still_under_way(tiny_model_dir):
    assignment = [{LAYER: list(range(E))}]
    shards, x, indices, weights, want = _layer_setup(tiny_model_dir, assignment)

    async def main():
        gated = _Gated(shards[0], asyncio.Event())
        dispatcher = Dispatcher(InProcessTransport({0: gated}), ExpertMap.from_assignment(assignment, n_experts=E))

        async def reached_the_shard():
            await asyncio.wait_for(gated.arrived.wait(), 10)
            gated.arrived.clear()

        old = asyncio.create_task(dispatcher(LAYER, x, indices, weights))
        await reached_the_shard()  # the old dispatch is under way (held at the shard) with map 0
        dispatcher.swap_map(ExpertMap.from_assignment(assignment, n_experts=E, version=1))
        new = asyncio.create_task(dispatcher(LAYER, x, indices, weights))
        await reached_the_shard()
        assert dispatcher.versions_in_use() == [0, 1] and gated.versions == [0, 1]
        gated.gate.set()
        results = await asyncio.gather(old, new)
        assert dispatcher.versions_in_use() == []
        return results

    for got in asyncio.run(main()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dispatch_records_each_shards_round_trip(tiny_model_dir):
    """`seconds_to` (the controller's before/after latency) sums each answered message's round trip per shard."""
    assignment = [{LAYER: list(range(0, 16, 2))}, {LAYER: list(range(1, 16, 2))}]
    shards, x, indices, weights, want = _layer_setup(tiny_model_dir, assignment)

    class Slow:
        async def dispatch(self, batch):
            await asyncio.sleep(0.05)
            return await shards[1].dispatch(batch)

    dispatcher = Dispatcher(InProcessTransport({0: shards[0], 1: Slow()}),
                            ExpertMap.from_assignment(assignment, n_experts=E))
    torch.testing.assert_close(asyncio.run(dispatcher(LAYER, x, indices, weights)), want, rtol=1e-5, atol=1e-6)
    stats = dispatcher.stats
    assert stats.messages_to == {0: 1, 1: 1}
    assert stats.seconds_to[1] >= 0.05 > stats.seconds_to[0] > 0
