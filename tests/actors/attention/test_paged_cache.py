"""The paged KV cache holds the model's state: logits through paged caches equal logits through the model's own
caches bit for bit (several sequences interleaved in a small-block pool, prefill + 30 decode steps crossing many
block boundaries, float32 and bfloat16); blocks held are exactly what the accounting says; PagedRows behaves as
GrowableRows and fails cleanly when the budget is spent; a memory budget becomes slots + blocks."""

from __future__ import annotations

import itertools

import pytest
import torch

import moemesh
from moemesh.actors.attention.paged_cache import OutOfBlocks, PagedKVCache, PagedRows
from moemesh.kernels.decode_state import GrowableRows


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(tiny_model_dir, request):
    return moemesh.load_model(tiny_model_dir, dtype=request.param)


def _prompts(vocab: int) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 90, 5)]


def test_paged_caches_give_exactly_the_default_caches_logits(model):
    kv = PagedKVCache(model.config, num_blocks=100, block_size=4, max_num_seqs=4, dtype=model.dtype)
    feed = _prompts(model.config.vocab_size)
    default = [model.new_cache() for _ in feed]
    paged = [kv.new_sequence() for _ in feed]
    for step in range(31):  # prefill of all three in one step, then 30 decode steps
        want = model.logits(model.step(feed, default))
        got = model.logits(model.step(feed, paged))
        assert torch.equal(got, want), f"step {step}"
        for cache in paged:
            assert kv.manager.blocks_held(cache.key) == kv.blocks_needed(cache.length)
        ends = torch.tensor([len(f) for f in feed]).cumsum(0) - 1
        feed = [[int(t)] for t in want[ends].argmax(-1)]
    tables = [c.layers[1].compressor.entries.blocks for c in paged]
    owner = {b: i for i, t in enumerate(tables) for b in t}
    in_order = [owner[b] for b in sorted(owner)]
    assert sum(a != b for a, b in itertools.pairwise(in_order)) >= 3  # the sequences' blocks interleave in the pool
    for cache in paged:
        kv.free(cache)
    kv.manager.check()
    assert kv.usage().used_blocks == 0 and kv.usage().used_slots == 0


def test_paged_rows_behave_as_growable_rows_and_fail_cleanly_when_full(tiny_model_dir):
    cfg = moemesh.load_model(tiny_model_dir).config
    kv = PagedKVCache(cfg, num_blocks=5, block_size=4, max_num_seqs=1)
    seq = kv.new_sequence("s")
    paged = seq.layers[1].compressor.entries  # rows of head_dim 32, 4 per block
    assert isinstance(paged, PagedRows)
    ref = GrowableRows(32, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for k in (3, 1, 0, 6, 5, 4):  # 19 rows: 5 blocks
        rows = torch.randn(k, 32, generator=g)
        paged.append(rows)
        ref.append(rows)
        assert paged.n == ref.n and torch.equal(paged.view(), ref.view()) and paged.nbytes() == ref.nbytes()
    with pytest.raises(OutOfBlocks, match="layer 1 kv rows need 1 more blocks, 0 of 5 are free"):
        paged.append(torch.randn(2, 32, generator=g))
    assert paged.n == 19 and torch.equal(paged.view(), ref.view())  # nothing changed
    kv.free(seq)
    assert kv.manager.num_free_blocks == 5


def test_slots_limit_sequences_and_a_memory_budget_is_split_into_slots_and_blocks(tiny_model_dir):
    cfg = moemesh.load_model(tiny_model_dir).config
    kv = PagedKVCache(cfg, memory_bytes=200_000, block_size=4, max_num_seqs=3)
    assert kv.num_blocks == (200_000 - 3 * kv.slot_bytes) // kv.block_bytes > 0
    assert kv.nbytes() <= 200_000 and kv.slot_bytes == kv.layout.slot_elems * 4
    assert kv.can_admit(40) and not kv.can_admit(10**6)
    seqs = [kv.new_sequence() for _ in range(3)]
    assert not kv.can_admit(1)
    with pytest.raises(OutOfBlocks, match="all 3 are held"):
        kv.new_sequence()
    kv.free(seqs[0])
    kv.new_sequence()
    with pytest.raises(ValueError, match=r"memory_bytes: 1000 B cannot hold 3 state slots of \d+ B"):
        PagedKVCache(cfg, memory_bytes=1000, max_num_seqs=3)
    with pytest.raises(ValueError, match="exactly one of num_blocks and memory_bytes"):
        PagedKVCache(cfg)
