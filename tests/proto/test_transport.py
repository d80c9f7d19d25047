"""Expert transports: gRPC and in-process give the ExpertBank's answer, shards holding disjoint experts sum to the full
bank, errors come back as the same exceptions through both, and the gRPC transport retries a shard that comes back."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from moemesh.actors.experts.shard import ExpertShard
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.moe import ExpertBank
from moemesh.kernels.weights import expert_tensor_names
from moemesh.proto import errors
from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import GrpcTransport, InProcessTransport

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

E, K, D, I = 8, 3, 16, 8  # experts, top-k, hidden, expert width


def _cfg(hidden: int = D) -> ModelConfig:
    return ModelConfig(vocab_size=50, hidden_size=hidden, moe_intermediate_size=I, n_routed_experts=E,
                       num_experts_per_tok=K, num_hidden_layers=2, layer_types=["sliding_attention"] * 2,
                       head_dim=16, num_attention_heads=2, o_groups=1, swiglu_limit=3.0)


def _tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g, out = torch.Generator().manual_seed(seed), {}
    for layer in range(cfg.num_hidden_layers):
        for e in range(E):
            w1, w2, w3 = expert_tensor_names(layer, e)
            out[w1] = torch.randn(I, cfg.hidden_size, generator=g) / 2
            out[w2] = torch.randn(cfg.hidden_size, I, generator=g) / 2
            out[w3] = torch.randn(I, cfg.hidden_size, generator=g) / 2
    return out


def _batch(n: int, layer: int = 1, seed: int = 1, hidden: int = D) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]) if n else torch.zeros(0, K).long()
    return TokenBatch(layer, torch.randn(n, hidden, generator=g), ids, torch.rand(n, K, generator=g))


def _full_bank(cfg: ModelConfig, tensors, layer: int) -> ExpertBank:
    return ExpertShard.from_tensors(cfg, {layer: range(E)}, tensors).banks[layer]


@contextlib.asynccontextmanager
async def _served(*shards: ExpertShard):
    started = [await serve_expert_shard(s) for s in shards]
    try:
        yield {i: f"127.0.0.1:{port}" for i, (_, port) in enumerate(started)}
    finally:
        for server, _ in started:
            await server.stop(None)


def test_grpc_equals_bank_and_in_process():
    cfg, tensors = _cfg(), _tensors(_cfg())
    shard = ExpertShard.from_tensors(cfg, {0: [1, 2], 1: range(E)}, tensors)
    batch = _batch(37)

    async def main():
        async with _served(shard) as addresses:
            grpc_t = GrpcTransport(addresses)
            try:
                return await grpc_t.dispatch(0, batch), await InProcessTransport({0: shard}).dispatch(0, batch)
            finally:
                await grpc_t.close()

    over_grpc, in_process = asyncio.run(main())
    with torch.no_grad():
        expected = _full_bank(cfg, tensors, 1)(batch.hidden, batch.expert_ids, batch.weights)
    assert expected.abs().max() > 0.1  # a real answer, not zeros
    torch.testing.assert_close(over_grpc, expected)
    torch.testing.assert_close(in_process, expected)


def test_disjoint_shards_sum_to_the_full_bank():
    cfg, tensors = _cfg(), _tensors(_cfg())
    shards = [ExpertShard.from_tensors(cfg, {1: ids}, tensors) for ids in ([0, 3, 4, 7], [1, 2, 5, 6])]
    batch = _batch(50, seed=5)

    async def main():
        async with _served(*shards) as addresses:
            transport = GrpcTransport(addresses)
            try:
                return await asyncio.gather(*(transport.dispatch(i, batch) for i in addresses))
            finally:
                await transport.close()

    parts = asyncio.run(main())
    with torch.no_grad():
        expected = _full_bank(cfg, tensors, 1)(batch.hidden, batch.expert_ids, batch.weights)
    assert all(p.abs().max() > 0.1 for p in parts)  # each shard contributes
    torch.testing.assert_close(parts[0] + parts[1], expected)


def test_bfloat16_hidden_and_int32_ids_travel():
    cfg, tensors = _cfg(), _tensors(_cfg())
    shard = ExpertShard.from_tensors(cfg, {1: range(E)}, tensors)
    b = _batch(9)
    batch = TokenBatch(1, b.hidden.to(torch.bfloat16), b.expert_ids.int(), b.weights)

    async def main():
        async with _served(shard) as addresses:
            transport = GrpcTransport(addresses)
            try:
                return await transport.dispatch(0, batch)
            finally:
                await transport.close()

    out = asyncio.run(main())
    with torch.no_grad():
        expected = shard.banks[1](batch.hidden.float(), b.expert_ids, b.weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


def test_large_batch_passes_grpc_default_message_limit():
    cfg = _cfg(hidden=1024)  # 2048 tokens x 1024 x fp32 = 8 MiB each way; gRPC's default limit is 4 MiB
    tensors = _tensors(cfg)
    shard = ExpertShard.from_tensors(cfg, {1: range(E)}, tensors)
    batch = _batch(2048, hidden=1024)

    async def main():
        async with _served(shard) as addresses:
            transport = GrpcTransport(addresses)
            try:
                return await transport.dispatch(0, batch)
            finally:
                await transport.close()

    out = asyncio.run(main())
    with torch.no_grad():
        torch.testing.assert_close(out, shard.banks[1](batch.hidden, batch.expert_ids, batch.weights))


@pytest.mark.parametrize("kind", ["grpc", "in_process"])
def test_errors_are_the_same_exceptions_through_both_transports(kind):
    cfg, tensors = _cfg(), _tensors(_cfg())
    shard = ExpertShard.from_tensors(cfg, {1: range(E)}, tensors, expert_map_version=4)
    good = _batch(3)
    cases = {
        "layer": (TokenBatch(0, good.hidden, good.expert_ids, good.weights, expert_map_version=4), errors.NotHeld),
        "hidden": (TokenBatch(1, torch.zeros(3, D + 1), good.expert_ids, good.weights, expert_map_version=4),
                   ValueError),
        "expert_map_version": (TokenBatch(1, good.hidden, good.expert_ids, good.weights, expert_map_version=3),
                               errors.StaleExpertMap),
        "shard": (None, ValueError),
    }

    async def main():
        async with _served(shard) as addresses:
            transport = GrpcTransport(addresses) if kind == "grpc" else InProcessTransport({0: shard})
            raised = {}
            try:
                for field, (batch, _) in cases.items():
                    with pytest.raises(Exception) as info:
                        await transport.dispatch(99 if batch is None else 0, batch or good)
                    raised[field] = info.value
            finally:
                await transport.close()
            return raised

    for field, exc in asyncio.run(main()).items():
        assert isinstance(exc, cases[field][1]), (field, exc)
        assert str(exc).startswith(f"{field}:"), (field, str(exc))


def test_grpc_retries_until_a_restarted_shard_answers():
    cfg, tensors = _cfg(), _tensors(_cfg())
    shard = ExpertShard.from_tensors(cfg, {1: range(E)}, tensors)
    batch = _batch(4)

    async def main(retries: int):
        server, port = await serve_expert_shard(shard)
        await server.stop(None)  # the shard is down; it comes back on the same port 0.2 s later

        async def restart():
            await asyncio.sleep(0.2)  # time under test: the shard's downtime, which the retries' backoff must outlast
            return (await serve_expert_shard(shard, port=port))[0]

        restarting = asyncio.create_task(restart())
        transport = GrpcTransport({0: f"127.0.0.1:{port}"}, retries=retries, backoff_s=0.05, timeout_s=5)
        try:
            return await transport.dispatch(0, batch)
        except errors.Unavailable as e:
            return e
        finally:
            await transport.close()
            await (await restarting).stop(None)

    assert isinstance(asyncio.run(main(retries=0)), errors.Unavailable)
    out = asyncio.run(main(retries=6))
    with torch.no_grad():
        torch.testing.assert_close(out, shard.banks[1](batch.hidden, batch.expert_ids, batch.weights))
