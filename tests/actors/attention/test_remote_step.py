"""The attention worker's step with experts in shards (in-process and over real gRPC) equals the model's own step."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import torch

import moemesh
from moemesh.actors.attention.remote_step import RemoteStep
from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.experts.server import serve_expert_shard
from moemesh.actors.experts.shard import ExpertShard
from moemesh.actors.io_loop import IoLoop
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.model import DeepseekV4
from moemesh.proto.transport import GrpcTransport, InProcessTransport


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    full = moemesh.load_model(tiny_model_dir)
    cfg, ckpt = full.config, Checkpoint(tiny_model_dir)
    # the worker's model: no routed experts here (weights copied from the full model for the test)
    worker_model = DeepseekV4(cfg, with_experts=False, engram_hasher=full.engram_hasher)
    worker_model.load_state_dict({k: v for k, v in full.state_dict().items() if ".ffn.experts." not in k})
    worker_model.requires_grad_(False).eval()
    moe_layers = list(range(cfg.num_hidden_layers))
    assignment = [{l: list(range(s, 16, 3)) for l in moe_layers} for s in range(3)]
    loader = partial(ckpt.read_experts, dequantize=False)  # as served: FP4 experts kept packed
    shards = [ExpertShard.from_loader(cfg, held, loader) for held in assignment]
    return full, worker_model, assignment, shards


async def _local_rows(model, hash_ids):
    return model.lookup_engram(hash_ids)


def _prompts(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 17, 64)]


def _generate(step_fn, model, prompt, n):
    cache, tokens = model.new_cache(), list(prompt)
    feed = list(prompt)
    for _ in range(n):
        hidden = step_fn([feed], [cache])
        tokens.append(int(model.logits(hidden[-1:]).argmax()))
        feed = tokens[-1:]
    return tokens


def test_in_process_shards_give_the_reference_tokens(setup):
    full, worker_model, assignment, shards = setup
    io = IoLoop()
    try:
        dispatcher = Dispatcher(InProcessTransport(dict(enumerate(shards))),
                                ExpertMap.from_assignment(assignment, n_experts=16))
        step = RemoteStep(worker_model, dispatcher, lambda h: _local_rows(full, h), io)
        for prompt in _prompts(full.config.vocab_size):
            want = full.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=None)[0].tolist()
            assert _generate(step, worker_model, prompt, 10) == want
    finally:
        io.close()


def test_grpc_shards_give_the_reference_logits(setup):
    full, worker_model, assignment, shards = setup
    io = IoLoop()

    async def start():
        return [await serve_expert_shard(s, "127.0.0.1", 0) for s in shards]

    servers = io.run(start())
    try:
        transport = GrpcTransport({i: f"127.0.0.1:{port}" for i, (_, port) in enumerate(servers)})
        step = RemoteStep(worker_model, Dispatcher(transport, ExpertMap.from_assignment(assignment, n_experts=16)),
                          lambda h: _local_rows(full, h), io)
        prompt = _prompts(full.config.vocab_size)[2]
        got = worker_model.logits(step([prompt], [worker_model.new_cache()]))
        want = full.logits(full.step([prompt], [full.new_cache()]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        stats = step.dispatcher.stats
        assert sum(stats.messages_to.values()) >= full.config.num_hidden_layers  # at least one message per layer
        io.run(transport.close())
    finally:
        async def stop():
            await asyncio.gather(*(server.stop(None) for server, _ in servers))

        io.run(stop())
        io.close()


# ---- micro-batches (ping-pong) and the Engram prefetch ----------------------------------------------------------------
def test_split_micro_batches_keeps_sequences_whole_contiguous_and_balanced():
    from moemesh.actors.attention.remote_step import split_micro_batches

    assert split_micro_batches([1] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_micro_batches([1] * 7, 2) == [range(0, 4), range(4, 7)]
    assert split_micro_batches([100, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]  # a long prefill alone
    assert split_micro_batches([1, 1, 1, 100], 2) == [range(0, 3), range(3, 4)]
    assert split_micro_batches([5], 2) == [range(0, 1)]  # one sequence: one micro-batch
    assert split_micro_batches([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_micro_batches([3, 3], 1) == [range(0, 2)]
    for lengths in ([1, 2, 3, 4, 5, 6, 7], [9, 1, 1, 1, 1, 1], [1] * 33):
        for parts in (1, 2, 3, 4):
            groups = split_micro_batches(lengths, parts)
            assert [i for g in groups for i in g] == list(range(len(lengths)))  # every sequence once, in order
            assert len(groups) == min(parts, len(lengths)) and all(len(g) for g in groups)


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_micro_batches_give_the_monolithic_engines_greedy_tokens(setup, micro_batches, greedy_outputs):
    """Continuous batching with prefills and decodes in one step: the served step split into 1, 2 or 3 micro-batches
    gives token for token what the single-process engine gives."""
    full, worker_model, assignment, shards = setup
    V = full.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 5, 33, 64, 7, 120)]
    want = greedy_outputs(full, None, prompts, 12)
    io, times = IoLoop(), []
    try:
        dispatcher = Dispatcher(InProcessTransport(dict(enumerate(shards))),
                                ExpertMap.from_assignment(assignment, n_experts=16))
        step = RemoteStep(worker_model, dispatcher, lambda h: _local_rows(full, h), io, micro_batches=micro_batches,
                          on_step=times.append)
        assert greedy_outputs(worker_model, step, prompts, 12) == want
    finally:
        io.close()
    assert max(t.micro_batches for t in times) == micro_batches
    for t in times:
        assert t.total > 0 and 0 <= t.wait_experts + t.wait_engram <= t.total
        assert t.compute == pytest.approx(t.total - t.wait_experts - t.wait_engram)


def test_the_engram_lookup_is_awaited_at_the_first_engram_layer_not_before_layer_0(setup):
    """The lookup starts with the step and answers only once layer 0's attention has run (the first Engram layer of
    `tiny` is 1): a step that waited for the rows before layer 0 would never finish."""
    import threading

    full, worker_model, assignment, shards = setup
    assert min(full.config.engram_layer_ids) >= 1
    layer0_ran = threading.Event()
    hook = worker_model.layers[0].attn.register_forward_hook(lambda *_: layer0_ran.set())
    asked = []

    async def lookup_after_layer_0(hash_ids):
        asked.append(sorted(hash_ids))
        assert await asyncio.to_thread(layer0_ran.wait, 30), "the step did not run layer 0 before taking the rows"
        return full.lookup_engram(hash_ids)

    io = IoLoop()
    try:
        dispatcher = Dispatcher(InProcessTransport(dict(enumerate(shards))),
                                ExpertMap.from_assignment(assignment, n_experts=16))
        step = RemoteStep(worker_model, dispatcher, lookup_after_layer_0, io, timeout_s=60)
        prompt = _prompts(full.config.vocab_size)[1]
        got = worker_model.logits(step([prompt], [worker_model.new_cache()]))
    finally:
        hook.remove()
        io.close()
    want = full.logits(full.step([prompt], [full.new_cache()]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert asked == [sorted(full.config.engram_layer_ids)]  # one lookup per step, for every Engram layer


def test_the_last_steps_timeline_records_every_layer_of_every_micro_batch(setup, tmp_path):
    """`last_trace`: per micro-batch and layer one compute span and one span of its tokens away; the step thread's
    compute spans never overlap (one thread); the picture of docs/serving.md is drawn from it."""
    from moemesh.cluster.bench.timeline import render, rows

    full, worker_model, assignment, shards = setup
    io = IoLoop()
    try:
        dispatcher = Dispatcher(InProcessTransport(dict(enumerate(shards))),
                                ExpertMap.from_assignment(assignment, n_experts=16))
        step = RemoteStep(worker_model, dispatcher, lambda h: _local_rows(full, h), io, micro_batches=2)
        prompts = _prompts(full.config.vocab_size)
        step(prompts, [worker_model.new_cache() for _ in prompts])
    finally:
        io.close()
    trace, layers = step.last_trace, full.config.num_hidden_layers
    for kind in ("compute", "experts"):
        assert sorted((m, l) for k, m, l, _, _ in trace if k == kind) == [(m, l) for m in (0, 1) for l in range(layers)]
    computes = sorted((s, e) for k, _, _, s, e in trace if k == "compute")
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(computes, computes[1:])) and all(s < e for s, e in computes)
    assert [k for k, *_ in trace].count("engram") == 1
    assert [label for label, *_ in rows(trace)][:3] == ["step thread: micro-batch 0 compute",
                                                        "step thread: micro-batch 0 waits",
                                                        "micro-batch 0 tokens at the expert shards"]
    out = tmp_path / "overlap.svg"
    render(trace, str(out), "test")
    assert out.read_text().startswith("<?xml") and "micro-batch 1" in out.read_text()
