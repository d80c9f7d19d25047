"""A whole disaggregated deployment in one process, no Ray: 3 expert shard hosts and 2 Engram shard hosts on real
gRPC servers, one attention worker driving them. Concurrent greedy requests return the reference tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

import moemesh
from moemesh.actors.attention.worker import AttentionWorker
from moemesh.actors.engram.service import engram_layout
from moemesh.cluster.config import ExpertsConfig
from moemesh.cluster.serve.hosts import EngramShardHost, ExpertShardHost
from moemesh.kernels.moe import ExpertBank


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    model = moemesh.load_model(tiny_model_dir)
    cfg = model.config
    assignment = ExpertsConfig(shards=3).resolve(list(range(cfg.num_hidden_layers)), cfg.n_routed_experts)
    experts = [ExpertShardHost(str(tiny_model_dir), held) for held in assignment]
    engram = [EngramShardHost(str(tiny_model_dir), ranges) for ranges in engram_layout(cfg, 2)]
    routes = [(h.shard.ranges, [h.grpc_address()]) for h in engram]
    worker = AttentionWorker(str(tiny_model_dir), [h.grpc_address() for h in experts], assignment, routes,
                             max_num_seqs=8, kv_cache_blocks=512, block_size=8)
    yield model, worker, experts, engram
    worker.io.close()
    for host in experts + engram:
        host.shutdown()


def test_concurrent_greedy_requests_match_the_reference(deployment):
    model, worker, experts, engram = deployment
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 40, 130)]

    async def one(i, prompt):
        tokens = []
        async for delta in worker.generate(f"r{i}", prompt, {"max_tokens": 12, "ignore_eos": True}):
            tokens += delta["token_ids"]
        return tokens

    async def run_all():  # one event loop for the engine's whole life, as in a Serve replica
        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await worker.engine.shutdown()

    got = asyncio.run(run_all())
    for prompt, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=None)[0, len(prompt):]
        assert tokens == want.tolist()
    stats = worker.stats()
    assert set(stats["messages_to"]) == {0, 1, 2}  # every shard was used
    assert stats["engram"]["lookups"] > 0 and stats["engram"]["cache_hits"] > 0  # decode re-reads hot N-grams
    assert sum(h.stats()["tokens"] for h in experts) > 0 and all(h.stats()["lookups"] > 0 for h in engram)
    assert worker.engine.engine.stats().num_running == 0
    step = stats["step"]  # the step's breakdown, as exported under moemesh:step_seconds_total{part}
    assert step["steps"] >= 12 and step["micro_batches"] > step["steps"]  # 4 sequences: split in 2 while all ran
    assert step["wait_experts"] > 0 and step["wait_engram"] >= 0 and step["scheduling"] > 0
    assert step["compute"] + step["wait_experts"] + step["wait_engram"] == pytest.approx(step["total"])
    from prometheus_client import generate_latest
    exported = generate_latest(worker.registry).decode()
    assert f'moemesh:step_seconds_total{{part="wait_experts"}} {step["wait_experts"]}' in exported
    assert 'moemesh:dispatch_seconds_total{shard="0"}' in exported


def test_worker_holds_no_routed_experts_and_shards_hold_them_packed(deployment):
    model, worker, experts, _ = deployment
    assert not [name for name, m in worker.model.named_modules() if isinstance(m, ExpertBank)]
    assert not [name for name in worker.model.state_dict() if ".ffn.experts." in name]
    banks = [bank for host in experts for bank in host.shard.banks.values()]
    assert banks and all(bank.is_packed and bank.packed.w1.fmt == "fp4" for bank in banks)
    float_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".ffn.experts." in n)
    held = sum(host.memory()["expert_bytes"] for host in experts)
    assert held * 7 < float_bytes  # FP4 + ue8m0 scales: 0.53 bytes a weight against float32's 4


def test_a_new_expert_map_takes_a_replica_in_and_out_with_identical_outputs(deployment, tiny_model_dir):
    """The controller's RPCs without Ray: map v1 adds a replica shard (started for v1) holding copies of some experts;
    tokens go to it and outputs stay the reference's; map v2 drops it, and its channel is released."""
    model, _, experts, engram = deployment
    cfg = model.config
    assignment = ExpertsConfig(shards=3).resolve(list(range(cfg.num_hidden_layers)), cfg.n_routed_experts)
    routes = [(h.shard.ranges, [h.grpc_address()]) for h in engram]
    worker = AttentionWorker(str(tiny_model_dir), [h.grpc_address() for h in experts], assignment, routes,
                             max_num_seqs=8, kv_cache_blocks=512, block_size=8)
    held = {layer: list(range(cfg.n_routed_experts)) for layer in range(cfg.num_hidden_layers)}
    replica = ExpertShardHost(str(tiny_model_dir), held, expert_map_version=1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 17)]

    async def generate(tag):
        async def one(i, prompt):
            tokens = []
            async for delta in worker.generate(f"{tag}{i}", prompt, {"max_tokens": 6, "ignore_eos": True}):
                tokens += delta["token_ids"]
            return tokens
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    async def main():
        try:
            before = await worker.expert_map_state()
            assert before == {"version": 0, "in_use": [], "shards": []}
            assert await worker.install_expert_map(1, {"replica-1": held}, {"replica-1": replica.grpc_address()}) == 1
            assert await worker.install_expert_map(1, {}, {}) == 1  # not newer: ignored
            with_replica = await generate("a")
            loads = await worker.expert_loads()
            sent = worker.stats()["messages_to"]
            assert await worker.install_expert_map(2, {}, {}) == 2
            assert await worker.release_shards(["replica-1"]) == ["replica-1"]
            without = await generate("b")
            after = await worker.expert_map_state()
            return with_replica, without, loads, sent, after
        finally:
            await worker.engine.shutdown()

    try:
        with_replica, without, loads, sent, after = asyncio.run(main())
        assert sent.get("replica-1", 0) > 0 and replica.stats()["tokens"] > 0  # the replica took its share
        assert sum(loads.values()) > 0 and all("/" in k for k in loads)
        assert after == {"version": 2, "in_use": [], "shards": []}
        for prompt, a, b in zip(prompts, with_replica, without):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=None)[0, len(prompt):]
            assert a == want.tolist() and b == want.tolist()
        with pytest.raises(ValueError, match="replicas: names must be non-empty strings"):
            asyncio.run(worker.install_expert_map(3, {"replica-9": held}, {}))
    finally:
        worker.io.close()
        replica.shutdown()
