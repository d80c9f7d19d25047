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
