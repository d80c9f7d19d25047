"""Automatic prefix caching, as bookkeeping: which token prefixes have a reusable state, and where it is.

A DeepSeek-V4 sequence's state at token P is its compressed entries (growing stores, in blocks) plus its fixed state
slot (sliding window, the compressors' open-window buffers and CSA overlap series). Entries are append-only, so the
blocks holding rows [0, rows(P)) of every store stay valid however the sequence grows; the slot is overwritten each
step, so a prefix is reusable only with a **snapshot** of the slot taken exactly at P (its open windows included:
a later request continues the partial window from the buffered projections, exactly as the first did).

Prefixes are cut every `block_tokens` tokens and content-addressed by the hash chain of their token blocks
(h_i = hash(h_{i-1}, block i)); an entry holds its blocks (one holder each in the `BlockManager`) and a snapshot id.
Entries are evicted least-recently-used when snapshots or blocks run out; blocks still held by a running sequence stay
with it. No tensors here: `PagedKVCache` saves and restores snapshots and copies blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from moemesh.actors.attention.blocks import BlockManager


@dataclass
class CachedPrefix:
    """A reusable state: the first `num_tokens` tokens (kept to rule out hash collisions), per store the blocks of
    its rows (the last one may be partly filled: rows past `rows(num_tokens)` belong to someone else), its snapshot."""

    key: int
    tokens: tuple[int, ...]
    tables: list[list[int]]
    snapshot: int

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class PrefixCache:
    """Content-addressed prefix states over a `BlockManager` (installs itself as the manager's `reclaim`).

    `match(tokens)` -> the longest cached prefix of `tokens` (shorter than it: one token is always left to compute);
    `register(tokens, key)` records the state sequence `key` holds after `tokens` (-> snapshot id to save into, or
    None if known or nothing can be evicted). Counters `queries`/`hits` count prompt tokens (the scheduler adds to
    them once per admission), as vLLM's prefix_cache_queries/hits do."""

    def __init__(self, blocks: BlockManager, block_tokens: int, num_snapshots: int):
        if block_tokens < 1 or num_snapshots < 1:
            raise ValueError(f"prefix cache: block_tokens and num_snapshots must be >= 1, got {block_tokens} "
                             f"and {num_snapshots}")
        self.blocks, self.block_tokens = blocks, block_tokens
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # LRU first
        self._free_snapshots = list(range(num_snapshots))
        self.queries = self.hits = 0  # prompt tokens looked up / found
        blocks.reclaim = self._reclaim

    def __len__(self) -> int:
        return len(self._entries)

    def chain(self, tokens: Sequence[int]) -> list[int]:
        """Hash of every whole block prefix: [h(tokens[:g]), h(tokens[:2g]), ...]."""
        out, h, g = [], 0, self.block_tokens
        for end in range(g, len(tokens) + 1, g):
            h = hash((h, tuple(tokens[end - g:end])))
            out.append(h)
        return out

    def match(self, tokens: Sequence[int]) -> CachedPrefix | None:
        """The longest cached prefix of `tokens` leaving at least one token to compute (marked recently used)."""
        hashes = self.chain(tokens[:-1])
        for h in reversed(hashes):
            entry = self._entries.get(h)
            if entry is not None and list(entry.tokens) == list(tokens[:entry.num_tokens]):
                self._entries.move_to_end(h)
                return entry
        return None

    def register(self, tokens: Sequence[int], key: Hashable) -> CachedPrefix | None:
        """Record that sequence `key` now holds the state after `tokens` (len a multiple of block_tokens) -> the new
        entry, whose snapshot the caller must save now; None if already cached or no snapshot could be freed."""
        h = self.chain(tokens)[-1]
        if h in self._entries:
            self._entries.move_to_end(h)
            return None
        if not self._free_snapshots and not self._evict_one():
            return None
        n = len(tokens)
        tables = [list(self.blocks.table(key, i)[: s.blocks(n)]) for i, s in enumerate(self.blocks.layout.stores)]
        for t in tables:
            self.blocks.hold(t)
        entry = CachedPrefix(h, tuple(tokens), tables, self._free_snapshots.pop())
        self._entries[h] = entry
        return entry

    def clear(self) -> None:
        while self._evict_one():
            pass

    def _evict_one(self) -> bool:
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        for t in entry.tables:
            self.blocks.release(t)
        self._free_snapshots.append(entry.snapshot)
        return True

    def _reclaim(self, blocks: int) -> None:
        """Evict least-recently-used entries until `blocks` more blocks are free (or nothing is cached)."""
        target = self.blocks.num_free_blocks + blocks
        while self.blocks.num_free_blocks < target and self._evict_one():
            pass

    def adopt(self, key: Hashable, entry: CachedPrefix) -> list[tuple[int, int]]:
        """Start admitted sequence `key` from `entry`: it shares the full blocks and gets a private copy of each
        partly filled last block (it will append rows there) -> the (source, destination) copies to make before the
        next step. OutOfBlocks if no block is left for a copy (then free `key`)."""
        self.blocks.adopt(key, entry.tables)
        copies = []
        for i, s in enumerate(self.blocks.layout.stores):
            table = self.blocks.table(key, i)
            if table and s.rows(entry.num_tokens) % s.rows_per_block:
                src, dst = table[-1], self.blocks.take_block()
                table[-1] = dst
                self.blocks.release([src])
                copies.append((src, dst))
        return copies
