"""Fault tolerance without Ray: expert shards and Engram replicas that stop and come back on another port (real gRPC
servers, addresses re-resolved), and requests moved off a lost attention worker (docs/reliability.md)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import moemesh
from moemesh.actors.attention.shard_avoidance import RecoveryConfig
from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.engram.client import EngramClient, EngramClientConfig, EngramRoute, GrpcEngramTransport
from moemesh.actors.engram.server import serve_engram_shard
from moemesh.actors.engram.service import EngramShard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.actors.experts.shard import ExpertShard
from moemesh.actors.ingress.generation import Choice, Generation, LeastLoadedRouter, WorkerLost
from moemesh.actors.ingress.text import StopCutter, TextCodec
from moemesh.actors.request import Delta, RequestParams
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.proto.transport import GrpcTransport

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
FAST = RecoveryConfig(deadline_s=20, backoff_s=0.05, max_backoff_s=0.2, probe_interval_s=0.1, probe_timeout_s=1)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return moemesh.load_model(tiny_model_dir)


def _resolver(current: dict):
    async def resolve(name):
        return current[name]
    return resolve


async def _restart_later(delay_s: float, start, current: dict, name) -> None:
    """A replacement server (new port) after `delay_s`, published where the resolver looks."""
    await asyncio.sleep(delay_s)  # time under test: the shard is away this long
    server, port = await start()
    current[name] = f"127.0.0.1:{port}"
    return server


def test_expert_shard_failover_to_a_replica_then_waiting_for_a_restart(model, tiny_model_dir):
    cfg, ckpt, layer = model.config, Checkpoint(tiny_model_dir), 2
    assignment = [{layer: list(range(0, 16, 2))}, {layer: list(range(0, 16, 2))}, {layer: list(range(1, 16, 2))}]
    shards = [ExpertShard.from_loader(cfg, held, ckpt.read_experts) for held in assignment]
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, indices = model.layers[layer].ffn.gate(x, torch.zeros(40, dtype=torch.long))
    want = model.layers[layer].ffn.experts(x, indices, weights)

    async def main():
        servers = [await serve_expert_shard(s, "127.0.0.1", 0) for s in shards]
        current = {i: f"127.0.0.1:{port}" for i, (_, port) in enumerate(servers)}
        transport = GrpcTransport(dict(current), retries=1, resolver=_resolver(current))
        dispatcher = Dispatcher(transport, ExpertMap.from_assignment(assignment, 16), FAST)
        restarted = None
        try:
            outs = [await dispatcher(layer, x, indices, weights)]
            await servers[1][0].stop(None)  # shard 1 dies; shard 0 holds the same experts
            outs.append(await dispatcher(layer, x, indices, weights))
            assert dispatcher.health.down == {1}
            await servers[2][0].stop(None)  # shard 2 dies; nobody else holds its experts
            shard2 = ExpertShard.from_loader(cfg, assignment[2], ckpt.read_experts)
            later = asyncio.ensure_future(_restart_later(
                0.5, lambda: serve_expert_shard(shard2, "127.0.0.1", 0), current, 2))
            outs.append(await dispatcher(layer, x, indices, weights))  # waits for the restart, finds the new port
            restarted = await later
            return outs, list(dispatcher.health.events)
        finally:
            await dispatcher.health.close()
            await transport.close()
            for server in [servers[0][0], restarted]:
                if server is not None:
                    await server.stop(None)

    outs, events = asyncio.run(main())
    for got in outs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    by_shard = {e["shard"]: e for e in events}
    assert by_shard["1"]["how"] == "rerouted" and by_shard["1"]["recovered_at"] >= by_shard["1"]["down_at"]
    assert by_shard["2"]["how"] == "restarted" and by_shard["2"]["healthy_at"] is not None


def test_engram_range_without_replica_waits_for_its_restart(model):
    from moemesh.actors.engram.service import engram_layout

    tables = {l: model.layers[l].engram_memory.embed.weight.detach() for l in model.config.engram_layer_ids}
    layout = engram_layout(model.config, 1)[0]
    hash_ids = model.engram_hash_ids([[5, 6, 7, 8, 9]], [model.new_cache()])

    async def main():
        server, port = await serve_engram_shard(EngramShard.from_tensors(model.config, layout, tables))
        current = {"a": f"127.0.0.1:{port}"}
        client = EngramClient(model.config, [EngramRoute(layout, ["a"])],
                              GrpcEngramTransport(dict(current), resolver=_resolver(current)),
                              EngramClientConfig(cache_rows=0, wait_for_restart=True, timeout_s=20,
                                                 restart_backoff_s=0.05))
        restarted = None
        try:
            await server.stop(None)
            later = asyncio.ensure_future(_restart_later(
                0.5, lambda: serve_engram_shard(EngramShard.from_tensors(model.config, layout, tables)), current,
                "a"))
            rows = await client.lookup(hash_ids)
            restarted = await later
            return rows, list(client.events)
        finally:
            await client.close()
            if restarted is not None:
                await restarted.stop(None)

    rows, events = asyncio.run(main())
    want = model.lookup_engram(hash_ids)
    assert all(torch.equal(rows[l], want[l]) for l in want)
    assert len(events) == 1 and events[0]["recovered_at"] > events[0]["failed_at"]


class _Counter:
    """A worker whose next token is (last token + 1) mod 50; it can die after `die_after` tokens."""

    def __init__(self, die_after: int | None = None):
        self.die_after, self.prompts, self.aborted, self.replays = die_after, [], [], []

    async def generate(self, request_id, prompt_token_ids, params):
        self.prompts.append(list(prompt_token_ids))
        self.replays.append(params.replay_chunks)
        last = prompt_token_ids[-1]
        for i in range(params.max_tokens):
            if self.die_after is not None and i == self.die_after:
                raise WorkerLost("the worker's process died")
            last = (last + 1) % 50
            yield Delta([last], finish_reason="length" if i == params.max_tokens - 1 else None,
                        completion_tokens=i + 1)

    async def load(self) -> float:
        return 0.0 if self.die_after is None else -1.0  # the dying one is picked first

    async def abort(self, request_id) -> None:
        self.aborted.append(request_id)


def test_a_request_moves_to_another_worker_when_its_worker_is_lost(tiny_model_dir):
    codec = TextCodec.from_checkpoint(tiny_model_dir)
    dying, healthy = _Counter(die_after=3), _Counter()
    router = LeastLoadedRouter([dying, healthy])
    params = RequestParams(max_tokens=8, temperature=0)

    async def main():
        worker = await router.pick()
        choice = Choice(0, "req-0", [10, 11], params, codec.decoder(), StopCutter([]))
        gen = Generation(worker, [choice], idle_timeout_s=10, prompt_tokens=2, router=router)
        gen.start()
        async for _ in gen.events():
            pass
        return choice, gen

    choice, gen = asyncio.run(main())
    assert healthy.prompts == [[10, 11, 12, 13, 14]]  # re-prefilled with the 3 tokens it already had
    assert healthy.replays == [[2, 1, 1, 1]]  # in the chunks the lost worker fed them
    assert choice.finish_reason == "length" and choice.tokens == 8 and gen.completion_tokens == 8
    record, = router.readmits
    assert record["tokens"] == 3 and record["resumed_at"] >= record["lost_at"]
    assert gen.usage()["prompt_tokens"] == 2


def test_a_moved_request_replayed_in_its_original_chunks_continues_exactly(model):
    """A one-chunk prefill of prompt + generated tokens can differ from prefill + decode steps (the CSA indexer's
    ties depend on the pool size when a query runs: here a 55-token prompt); replaying the original chunks cannot."""
    from moemesh.actors.attention.engine import Engine
    from moemesh.actors.request import RequestParams

    prompt = torch.randint(3, model.config.vocab_size, (55,), generator=torch.Generator().manual_seed(7)).tolist()
    full = model.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=None)[0, len(prompt):].tolist()
    for k in (1, 4, 8):
        engine = Engine(model)
        engine.add_request("r", prompt + full[:k], RequestParams(max_tokens=10 - k, ignore_eos=True,
                                                                 replay_chunks=[len(prompt)] + [1] * k))
        out = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        assert out == full[k:], k
    with pytest.raises(ValueError, match="replay_chunks"):
        Engine(model).add_request("r", prompt, RequestParams(replay_chunks=[3]))
