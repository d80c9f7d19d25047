"""Real shards of the tiny model for the gRPC security and garbage tests: an expert shard holding a few experts of
layers 0 and 1, and Engram shard 0 of 2 (read from the checkpoint)."""

import pytest


@pytest.fixture(scope="module")
def expert_shard(tiny_model_dir):
    from moemesh.actors.experts.shard import ExpertShard
    from moemesh.kernels.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_model_dir)
    shard = ExpertShard.from_loader(ckpt.config, {0: [0, 1, 2], 1: [3, 4]}, ckpt.read_experts)
    yield shard
    shard.close()


@pytest.fixture(scope="module")
def engram_shard(tiny_model_dir):
    from moemesh.actors.engram.service import EngramShard, engram_layout
    from moemesh.kernels.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny_model_dir)
    shard = EngramShard.from_checkpoint(ckpt, engram_layout(ckpt.config, 2)[0])
    yield shard
    shard.close()
