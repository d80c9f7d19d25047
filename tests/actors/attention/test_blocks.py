"""Block accounting without tensors: what a sequence of n tokens needs (every compressed store, each row width
packed into the same block bytes; fixed state in one exact-size slot), and the allocator's invariants under random
admit / allocate / grow / free: no block held twice, all-or-nothing allocation, exact usage, everything back at
the end."""

from __future__ import annotations

import itertools
import random

import pytest

from moemesh.actors.attention.blocks import BlockManager, CacheLayout, OutOfBlocks
from moemesh.kernels.tiny import tiny_config

CFG = tiny_config(512)  # layers: sliding, CSA (rate 4), HCA (rate 8), CSA; head_dim 32, index_head_dim 16, window 16


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 31, 200, 1001])
def test_blocks_needed_counts_every_compressed_store(block_size, n):
    layout = CacheLayout.from_config(CFG, block_size)
    kv_rows, index_rows = block_size, block_size * 32 // 16  # a block holds block_size rows of head_dim
    csa = _ceil(n // 4, kv_rows) + _ceil(n // 4, index_rows)  # compressed entries + the indexer's entries
    hca = _ceil(n // 8, kv_rows)
    assert layout.blocks_needed(n) == 2 * csa + hca


def test_the_state_slot_holds_exactly_the_fixed_state():
    layout = CacheLayout.from_config(CFG, 4)
    window = 4 * 15 * 32  # every layer: sliding_window-1 rows of head_dim
    csa = 2 * 3 * 64 + 2 * 4 * 32 + 2 * 3 * 32 + 2 * 4 * 16  # buf kv+gate (2 series), overlap kv+gate; indexer same
    hca = 2 * 7 * 32  # buf kv+gate, one series, no overlap
    assert layout.slot_elems == window + 2 * csa + hca
    ends = sorted((f.offset, f.offset + f.rows * f.width) for f in layout.fields)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends)) and ends[-1][1] == layout.slot_elems  # no gaps


def test_max_tokens_is_the_longest_sequence_that_fits():
    layout = CacheLayout.from_config(CFG, 4)
    for blocks in (0, 1, 7, 50, 333):
        n = layout.max_tokens(blocks, 10_000)
        assert layout.blocks_needed(n) <= blocks < layout.blocks_needed(n + 1)


def test_random_admit_allocate_free_keeps_the_invariants():
    rng = random.Random(0)
    m = BlockManager(CacheLayout.from_config(CFG, 4), num_blocks=120, num_slots=5)
    tokens: dict[int, int] = {}  # key -> tokens allocated for
    for step in range(3000):
        op, key = rng.random(), rng.randrange(8)
        if key not in tokens:
            if m.num_free_slots:
                m.admit(key)
                tokens[key] = 0
            else:
                with pytest.raises(OutOfBlocks, match="no free state slot"):
                    m.admit(key)
        elif op < 0.6:
            want = tokens[key] + rng.randrange(1, 40)
            free_before, extra = m.num_free_blocks, m.extra_blocks(key, want)
            if extra <= free_before:
                m.allocate(key, want)
                tokens[key] = want
                assert m.num_free_blocks == free_before - extra
            else:
                with pytest.raises(OutOfBlocks, match=f"needs {extra} more blocks"):
                    m.allocate(key, want)
                assert m.num_free_blocks == free_before  # all or nothing
        else:
            m.free(key)
            del tokens[key]
        m.check()
        assert all(m.blocks_held(k) == m.blocks_needed(n) for k, n in tokens.items())
        usage = m.usage()
        assert usage.used_blocks == sum(m.blocks_needed(n) for n in tokens.values())
        assert usage.used_slots == len(tokens)
    for key in list(tokens):
        m.free(key)
    m.check()
    assert m.usage().used_blocks == 0 and m.usage().fraction == 0


def test_grow_serves_one_store_and_free_refuses_unknown_keys():
    m = BlockManager(CacheLayout.from_config(CFG, 4), num_blocks=3, num_slots=1)
    m.admit("a")
    m.grow("a", 0, 9)  # 9 rows of 4 per block
    assert len(m.table("a", 0)) == 3 and m.num_free_blocks == 0
    with pytest.raises(OutOfBlocks, match="layer 1 kv rows need 1 more blocks, 0 of 3 are free"):
        m.grow("a", 0, 13)
    with pytest.raises(ValueError, match="already admitted"):
        m.admit("a")
    m.free("a")
    with pytest.raises(ValueError, match="holds nothing"):
        m.free("a")
    m.check()


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="block_size: must be >= 1, got 0"):
        CacheLayout.from_config(CFG, 0)
    with pytest.raises(ValueError, match="num_slots >= 1"):
        BlockManager(CacheLayout.from_config(CFG, 4), num_blocks=4, num_slots=0)
