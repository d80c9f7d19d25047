"""Attention-worker dispatch: routing tokens to shards (once per destination), replicas, and the combine."""

from __future__ import annotations

import asyncio

import pytest
import torch

import moemesh
from moemesh.actors.dispatch import Dispatcher, ExpertMap
from moemesh.actors.expert_shard import ExpertShard
from moemesh.kernels.checkpoint import Checkpoint
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


def test_dispatch_over_shards_with_replicas_equals_the_full_bank(tiny_model_dir):
    model = moemesh.load_model(tiny_model_dir)
    cfg, ckpt = model.config, Checkpoint(tiny_model_dir)
    layer = 2
    assignment = [{layer: list(range(0, 16, 2))}, {layer: list(range(1, 16, 2))}, {layer: [0, 1, 2, 3]}]

    def loader(layer_id, ids):
        return ckpt.read_experts(layer_id, ids)

    shards = {i: ExpertShard.from_loader(cfg, held, loader) for i, held in enumerate(assignment)}
    dispatcher = Dispatcher(InProcessTransport(shards), ExpertMap.from_assignment(assignment, n_experts=E))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, cfg.hidden_size, generator=g)
    weights, indices = model.layers[layer].ffn.gate(x, torch.zeros(33, dtype=torch.long))
    got = asyncio.run(dispatcher(layer, x, indices, weights))
    want = model.layers[layer].ffn.experts(x, indices, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stats = dispatcher.stats
    assert sum(stats.tokens_per_expert.values()) == 33 * cfg.num_experts_per_tok
    assert set(stats.messages_to) <= {0, 1, 2} and sum(stats.messages_to.values()) == len(stats.messages_to)
