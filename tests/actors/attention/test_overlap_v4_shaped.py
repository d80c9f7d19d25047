"""The overlapped served step on V4-Flash-shaped models (the built-in v4-flash-mini / v4.1-flash-mini structure at
reduced width: 43 / 40 layers, 256 / 384 experts top-6, hash routing in the first 3 MoE layers, 4 hc streams, Engram
at layers 1 and 14 for v4.1), stored as released (FP4 experts, FP8 dense): the engine with packed expert shards and
1 or 2 micro-batches gives the monolithic engine's greedy tokens, token for token."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import moemesh
from moemesh.actors.attention.remote_step import RemoteStep
from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.experts.shard import ExpertShard
from moemesh.actors.io_loop import IoLoop
from moemesh.kernels.builtin import builtin_model
from moemesh.kernels.checkpoint import Checkpoint
from moemesh.kernels.synthetic import BuiltinModel, write_model
from moemesh.proto.transport import InProcessTransport

NARROW = {"hidden_size": 64, "moe_intermediate_size": 16, "head_dim": 16, "q_lora_rank": 16, "o_lora_rank": 16,
          "index_head_dim": 4}  # widths only (as tests/kernels/test_builtin_models.py narrows them)


@pytest.fixture(scope="module", params=["v4-flash-mini", "v4.1-flash-mini"])
def narrow_v4(request, tmp_path_factory):
    model = builtin_model(request.param)
    extra = {"engram_vocab_size": [1024, 1024], "engram_head_dim": 8} if "engram_layer_ids" in model.config else {}
    narrow = BuiltinModel(f"{request.param}-narrow", {**model.config, **NARROW, **extra},
                          {"v4": 1 << 20, "float32": 4 << 20, "bfloat16": 2 << 20})
    return write_model(narrow, tmp_path_factory.mktemp(request.param), "v4")


@pytest.mark.timeout(900)
def test_packed_shards_and_micro_batches_give_the_monolithic_tokens(narrow_v4, greedy_outputs):
    full = moemesh.load_model(narrow_v4)
    cfg, ckpt = full.config, Checkpoint(narrow_v4)
    assert cfg.num_hidden_layers in (40, 43) and cfg.num_experts_per_tok == 6
    worker = moemesh.load_model(narrow_v4, with_experts=False, with_engram_tables=False)
    layers = range(cfg.num_hidden_layers)
    assignment = [{layer: list(range(s, cfg.n_routed_experts, 2)) for layer in layers} for s in range(2)]
    shards = {i: ExpertShard.from_loader(cfg, held, partial(ckpt.read_experts, dequantize=False))
              for i, held in enumerate(assignment)}
    assert all(b.is_packed and b.packed.w1.fmt == "fp4" for s in shards.values() for b in s.banks.values())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 9, 150, 1)]
    want = greedy_outputs(full, None, prompts, 4, block_size=16)

    async def rows(hash_ids):
        return full.lookup_engram(hash_ids)

    io = IoLoop()
    try:
        for micro_batches in (1, 2):
            dispatcher = Dispatcher(InProcessTransport(shards),
                                    ExpertMap.from_assignment(assignment, cfg.n_routed_experts))
            step = RemoteStep(worker, dispatcher, rows if cfg.has_engram else None, io, micro_batches=micro_batches)
            assert greedy_outputs(worker, step, prompts, 4, block_size=16) == want, f"{micro_batches} micro-batch(es)"
    finally:
        io.close()
