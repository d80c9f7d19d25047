"""ExpertShard: loading a plan's experts, batching requests of several workers into one grouped computation, request
validation, overload, counters; and its gRPC server: malformed requests get INVALID_ARGUMENT (NOT_FOUND for a layer
not held) and the server keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moemesh.actors.experts.server import serve_expert_shard
from moemesh.actors.experts.shard import BatchingConfig, ExpertShard
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.weights import expert_tensor_names
from moemesh.proto import codec, errors, expert_pb2, expert_pb2_grpc, health_pb2, health_pb2_grpc, tensor_pb2
from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import GrpcTransport

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

E, K, D, I = 8, 3, 16, 8  # experts, top-k, hidden, expert width
CFG = ModelConfig(vocab_size=50, hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                  num_hidden_layers=3, layer_types=["sliding_attention"] * 3, head_dim=16, num_attention_heads=2,
                  o_groups=1, swiglu_limit=3.0)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g, out = torch.Generator().manual_seed(seed), {}
    for layer in range(CFG.num_hidden_layers):
        for e in range(E):
            w1, w2, w3 = expert_tensor_names(layer, e)
            out[w1], out[w2], out[w3] = (torch.randn(I, D, generator=g) / 2, torch.randn(D, I, generator=g) / 2,
                                         torch.randn(I, D, generator=g) / 2)
    return out


TENSORS = _tensors()


def _batch(n: int, layer: int = 1, seed: int = 1, k: int = K) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
    return TokenBatch(layer, torch.randn(n, D, generator=g), ids, torch.rand(n, k, generator=g))


def _direct(shard: ExpertShard, b: TokenBatch) -> torch.Tensor:
    with torch.no_grad():
        return shard.banks[b.layer](b.hidden.float(), b.expert_ids.long(), b.weights).to(b.hidden.dtype)


# ---- loading ---------------------------------------------------------------------------------------------------------
def test_loader_is_asked_for_each_layer_of_the_plan():
    calls = []

    def loader(layer, ids):
        calls.append((layer, list(ids)))
        return {name: TENSORS[name] for e in ids for name in expert_tensor_names(layer, e)}

    shard = ExpertShard.from_loader(CFG, {2: [5, 1], 0: [3]}, loader)
    assert calls == [(0, [3]), (2, [1, 5])]
    assert shard.assignment == {0: [3], 2: [1, 5]}
    assert torch.equal(shard.banks[2].expert_weights(1)[1], TENSORS["layers.2.ffn.experts.5.w2.weight"])


@pytest.mark.parametrize("assignment, tensors, match", [
    ({1: [2]}, {k: v for k, v in TENSORS.items() if "experts.2.w3" not in k},
     r"layers\.1\.ffn\.experts\.2\.w3\.weight: missing"),
    ({1: [2]}, {**TENSORS, "layers.1.ffn.experts.2.w1.weight": torch.zeros(I, D + 1)},
     r"layers\.1\.ffn\.experts\.2\.w1\.weight: shape \[8, 17\], expected \[8, 16\]"),
    ({3: [0]}, TENSORS, r"assignment: layer 3 out of range"),
    ({1: [8]}, TENSORS, r"assignment\[1\]: expert ids"),
    ({1: []}, TENSORS, r"assignment\[1\]: expert ids"),
])
def test_bad_plan_or_tensors_name_the_culprit(assignment, tensors, match):
    with pytest.raises(ValueError, match=match):
        ExpertShard.from_tensors(CFG, assignment, tensors)


def test_shards_loaded_from_the_checkpoint_add_up_to_the_models_experts(tiny_model_dir):
    from moemesh import load_model
    from moemesh.kernels.checkpoint import Checkpoint

    model, checkpoint = load_model(tiny_model_dir), Checkpoint(tiny_model_dir)
    cfg, layer = model.config, 2
    halves = [range(0, cfg.n_routed_experts, 2), range(1, cfg.n_routed_experts, 2)]
    shards = [ExpertShard.from_loader(cfg, {layer: ids}, checkpoint.read_experts) for ids in halves]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok] for _ in range(6)])
    batch = TokenBatch(layer, x, ids, torch.rand(6, cfg.num_experts_per_tok, generator=g))
    parts = [asyncio.run(s.dispatch(batch)) for s in shards]
    with torch.no_grad():
        expected = model.layers[layer].ffn.experts(x, ids, batch.weights)
    assert expected.abs().max() > 0
    torch.testing.assert_close(parts[0] + parts[1], expected)


# ---- batching --------------------------------------------------------------------------------------------------------
def test_concurrent_workers_merge_into_one_computation_over_grpc():
    batches = [_batch(n, seed=s) for s, n in enumerate([5, 9, 1, 7])]
    all_tokens = BatchingConfig(max_wait_s=10.0, max_tokens=sum(b.n_tokens for b in batches))  # runs at the 4th
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS, batching=all_tokens)

    async def main():
        server, port = await serve_expert_shard(shard)
        workers = [GrpcTransport({0: f"127.0.0.1:{port}"}) for _ in batches]  # one channel per attention worker
        try:
            calls = (w.dispatch(0, b) for w, b in zip(workers, batches))
            return await asyncio.wait_for(asyncio.gather(*calls), 5)  # well before max_wait_s
        finally:
            for w in workers:
                await w.close()
            await server.stop(None)

    outs = asyncio.run(main())
    assert shard.counters.batches == 1 and shard.counters.requests == 4
    for out, b in zip(outs, batches):
        torch.testing.assert_close(out, _direct(shard, b))


def test_an_idle_shard_computes_at_once_and_merges_what_arrives_while_it_computes():
    """Default batching (no idle wait): a lone request runs as soon as it arrives; three that arrive while that
    computation runs wait for it, then run as one."""
    import threading

    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS)
    assert shard.batching.max_wait_s == 0
    gate, real, sizes = threading.Event(), shard._compute, []

    def gated(layer, batches):
        sizes.append(len(batches))
        if len(sizes) == 1:
            assert gate.wait(10)  # the first computation holds until the others have queued
        return real(layer, batches)

    shard._compute = gated
    later = [_batch(2, seed=s) for s in range(3)]

    async def main():
        first = asyncio.ensure_future(shard.dispatch(_batch(3)))
        while not sizes:  # the lone request started computing without waiting for company
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(shard.dispatch(b)) for b in later]
        while shard._queues.get(1) is None or shard._queues[1].tokens < 6:
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), 10)

    outs = asyncio.run(main())
    assert sizes == [1, 3] and shard.counters.batches == 2
    for out, b in zip(outs, [_batch(3), *later]):
        torch.testing.assert_close(out, _direct(shard, b))


def test_max_wait_runs_a_partial_batch_and_max_tokens_a_full_one():
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS,
                                     batching=BatchingConfig(max_wait_s=0.05, max_tokens=8))

    async def main():
        lone = await asyncio.wait_for(shard.dispatch(_batch(3)), 5)  # below max_tokens: runs after max_wait_s
        after_lone = shard.counters.batches
        pair = (shard.dispatch(_batch(4, seed=2)), shard.dispatch(_batch(4, seed=3)))  # 8 tokens: runs at once
        full = await asyncio.wait_for(asyncio.gather(*pair), 5)
        return lone, after_lone, full

    lone, after_lone, full = asyncio.run(main())
    assert after_lone == 1 and shard.counters.batches == 2
    torch.testing.assert_close(lone, _direct(shard, _batch(3)))
    torch.testing.assert_close(full[1], _direct(shard, _batch(4, seed=3)))


def test_layers_batch_separately_and_mixed_k_and_dtypes_share_a_batch():
    shard = ExpertShard.from_tensors(CFG, {0: range(E), 1: [0, 2, 4, 6]}, TENSORS,
                                     batching=BatchingConfig(max_wait_s=0.05, max_tokens=10_000))
    b16 = _batch(6, layer=1, seed=4, k=1)
    requests = [_batch(5, layer=1), TokenBatch(1, b16.hidden.to(torch.bfloat16), b16.expert_ids.int(), b16.weights),
                _batch(4, layer=0, seed=7)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(shard.dispatch(r) for r in requests)), 5)

    outs = asyncio.run(main())
    assert shard.counters.batches == 2  # layer 1 (two requests) and layer 0
    assert outs[1].dtype == torch.bfloat16 and outs[1].shape == (6, D)
    for out, r in zip(outs, requests):
        torch.testing.assert_close(out, _direct(shard, r))


def test_counters_count_tokens_per_expert_and_bytes():
    shard = ExpertShard.from_tensors(CFG, {1: [0, 1, 2]}, TENSORS)
    b = TokenBatch(1, torch.randn(3, D), torch.tensor([[0, 1, 5], [1, -1, 7], [2, 1, 0]]), torch.rand(3, 3))
    out = asyncio.run(shard.dispatch(b))
    assert shard.counters.tokens_per_expert == {1: {0: 2, 1: 3, 2: 1}}
    assert shard.counters.tokens == 3 and shard.counters.batches == 1
    assert shard.counters.bytes_in == 3 * D * 4 + 9 * 8 + 9 * 4 and shard.counters.bytes_out == out.numel() * 4


def test_empty_request_answers_empty_without_a_computation():
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS)
    out = asyncio.run(shard.dispatch(_batch(0)))
    assert out.shape == (0, D) and shard.counters.batches == 0


async def _until(condition) -> None:
    """Yield to the event loop until `condition()` holds (callers bound it with `asyncio.wait_for`)."""
    while not condition():
        await asyncio.sleep(0)


def test_overload_refuses_new_work_beyond_the_pending_limit():
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS,
                                     batching=BatchingConfig(max_wait_s=0.1, max_tokens=10_000, max_pending_tokens=10))

    async def main():
        first = asyncio.ensure_future(shard.dispatch(_batch(8)))  # pending for max_wait_s
        await asyncio.wait_for(_until(lambda: shard.counters.requests == 1), 5)  # its 8 tokens are pending now
        with pytest.raises(errors.Overloaded, match="8 tokens pending"):
            await shard.dispatch(_batch(3))
        small = await shard.dispatch(_batch(2))  # fits: joins the first batch
        return await first, small

    first, small = asyncio.run(main())
    assert shard.counters.rejected == 1 and shard.counters.batches == 1
    torch.testing.assert_close(first, _direct(shard, _batch(8)))
    big = asyncio.run(shard.dispatch(_batch(30)))  # nothing pending: even a request above the limit is taken
    assert big.shape == (30, D)


# ---- validation ------------------------------------------------------------------------------------------------------
GOOD = _batch(4)
BAD = {
    "layer": (TokenBatch(2, GOOD.hidden, GOOD.expert_ids, GOOD.weights), errors.NotHeld),
    "hidden size": (TokenBatch(1, torch.zeros(4, D - 1), GOOD.expert_ids, GOOD.weights), ValueError),
    "hidden dtype": (TokenBatch(1, GOOD.hidden.double(), GOOD.expert_ids, GOOD.weights), ValueError),
    "hidden rank": (TokenBatch(1, torch.zeros(4 * D), GOOD.expert_ids, GOOD.weights), ValueError),
    "expert_ids dtype": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids.float(), GOOD.weights), ValueError),
    "expert_ids rows": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids[:3], GOOD.weights[:3]), ValueError),
    "expert_ids range": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids.clone().fill_(E), GOOD.weights), ValueError),
    "expert_ids below -1": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids.clone().fill_(-2), GOOD.weights), ValueError),
    "weights shape (k)": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids, GOOD.weights[:, :2]), ValueError),
    "weights dtype": (TokenBatch(1, GOOD.hidden, GOOD.expert_ids, GOOD.weights.half()), ValueError),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_requests_raise_naming_the_field(case):
    shard = ExpertShard.from_tensors(CFG, {0: [1], 1: range(E)}, TENSORS)
    batch, kind = BAD[case]
    with pytest.raises(kind, match=f"^{case.split()[0]}:"):
        asyncio.run(shard.dispatch(batch))
    assert shard.counters.requests == 0
    torch.testing.assert_close(asyncio.run(shard.dispatch(GOOD)), _direct(shard, GOOD))


def test_a_shard_refuses_maps_older_than_the_one_it_joined_and_serves_newer_ones():
    """A replica started for map version 5 is in no map before 5; a worker that still routes by 4 is stale (it cannot
    have meant this shard), while 5 and later maps (the shard stays in them until dropped) are served."""
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS, expert_map_version=5)
    at = {v: TokenBatch(1, GOOD.hidden, GOOD.expert_ids, GOOD.weights, expert_map_version=v) for v in (4, 5, 9)}
    with pytest.raises(errors.StaleExpertMap, match="^expert_map_version: request routed with 4"):
        asyncio.run(shard.dispatch(at[4]))
    for v in (5, 9):
        torch.testing.assert_close(asyncio.run(shard.dispatch(at[v])), _direct(shard, GOOD))

    async def over_grpc():
        server, port = await serve_expert_shard(shard)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as stale:
                    await expert_pb2_grpc.ExpertShardStub(channel).Dispatch(codec.encode_dispatch(at[4]), timeout=5)
        finally:
            await server.stop(None)
        return stale.value

    stale = asyncio.run(over_grpc())
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION and "expert_map_version" in stale.details()


# ---- the gRPC server -------------------------------------------------------------------------------------------------
def _raw(batch: TokenBatch, **edits) -> expert_pb2.DispatchRequest:
    msg = codec.encode_dispatch(batch)
    for field, value in edits.items():
        getattr(msg, field).CopyFrom(value)
    return msg


def _float64(t):
    return tensor_pb2.Tensor(data=t.double().numpy().tobytes(), dtype="float64", shape=list(t.shape))


MALFORMED = {
    "wrong dtype": (_raw(GOOD, hidden=_float64(GOOD.hidden)), grpc.StatusCode.INVALID_ARGUMENT, "hidden.dtype"),
    "truncated bytes": (_raw(GOOD, weights=tensor_pb2.Tensor(data=codec.encode_tensor(GOOD.weights).data[:-3],
                                                              dtype="float32", shape=[4, K])),
                        grpc.StatusCode.INVALID_ARGUMENT, "weights.data"),
    "missing tensor": (expert_pb2.DispatchRequest(layer=1), grpc.StatusCode.INVALID_ARGUMENT, "hidden: missing"),
    "unknown layer": (_raw(TokenBatch(2, GOOD.hidden, GOOD.expert_ids, GOOD.weights)), grpc.StatusCode.NOT_FOUND,
                      "layer: 2"),
    "hidden size": (_raw(TokenBatch(1, torch.zeros(4, D + 4), GOOD.expert_ids, GOOD.weights)),
                    grpc.StatusCode.INVALID_ARGUMENT, "hidden: shape"),
}


def test_malformed_requests_get_status_codes_and_the_server_keeps_serving():
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS)

    async def main():
        server, port = await serve_expert_shard(shard)
        seen = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = expert_pb2_grpc.ExpertShardStub(channel)
                for name, (msg, _, _) in MALFORMED.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Dispatch(msg, timeout=5)
                    seen[name] = info.value
                with pytest.raises(grpc.aio.AioRpcError) as info:  # random garbage on a raw channel call
                    await channel.unary_unary("/moemesh.ExpertShard/Dispatch")(
                        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                      dtype=torch.uint8).numpy().tobytes(), timeout=5)
                seen["garbage"] = info.value
                reply = await stub.Dispatch(codec.encode_dispatch(GOOD), timeout=5)
        finally:
            await server.stop(None)
        return seen, reply

    seen, reply = asyncio.run(main())
    for name, (_, code, text) in MALFORMED.items():
        assert seen[name].code() == code, (name, seen[name].code(), seen[name].details())
        assert text in seen[name].details(), (name, seen[name].details())
    assert seen["garbage"].code() == grpc.StatusCode.INVALID_ARGUMENT
    torch.testing.assert_close(codec.decode_dispatch_reply(reply), _direct(shard, GOOD))


def test_a_failing_computation_is_internal_and_the_next_request_succeeds(monkeypatch):
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS)
    real, calls = shard._compute, []

    def flaky(layer, batches):
        calls.append(layer)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return real(layer, batches)

    monkeypatch.setattr(shard, "_compute", flaky)

    async def main():
        server, port = await serve_expert_shard(shard)
        transport = GrpcTransport({0: f"127.0.0.1:{port}"})
        try:
            with pytest.raises(errors.RemoteError) as info:
                await transport.dispatch(0, GOOD)
            return info.value, await transport.dispatch(0, GOOD)
        finally:
            await transport.close()
            await server.stop(None)

    err, out = asyncio.run(main())
    assert err.code == grpc.StatusCode.INTERNAL and "device fell over" in str(err)
    torch.testing.assert_close(out, _direct(shard, GOOD))


def test_health_reports_serving_then_not_serving():
    shard = ExpertShard.from_tensors(CFG, {1: range(E)}, TENSORS, expert_map_version=5)

    async def main():
        server, port = await serve_expert_shard(shard)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                before = await stub.Check(health_pb2.HealthCheckRequest(service="moemesh.ExpertShard"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.Check(health_pb2.HealthCheckRequest(service="moemesh.Nope"), timeout=5)
                shard.close()
                after = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as closed:
                    await expert_pb2_grpc.ExpertShardStub(channel).Dispatch(codec.encode_dispatch(
                        TokenBatch(1, GOOD.hidden, GOOD.expert_ids, GOOD.weights, expert_map_version=5)), timeout=5)
        finally:
            await server.stop(None)
        return before, unknown.value, after, closed.value

    before, unknown, after, closed = asyncio.run(main())
    from moemesh import __version__

    assert before.status == health_pb2.HealthCheckResponse.SERVING
    assert (before.version, before.expert_map_version) == (__version__, 5) and "{1: 8}" in before.detail
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert closed.code() == grpc.StatusCode.UNAVAILABLE
