"""Bookkeeping of the paged KV cache, without tensors: what one sequence of a DeepSeek-V4 model needs
(`CacheLayout`) and who holds which block and state slot (`BlockManager`). The scheduler plans with these alone;
`paged_cache.PagedKVCache` puts tensors behind them.

A sequence's state per layer (see `kernels/decode_state.py`) is of two kinds:
- growing: the compressed entries of CSA/HCA layers (`n // rate` rows of head_dim) and of CSA's indexer (`n // rate`
  rows of index_head_dim). They live in fixed-size **blocks** of one shared pool: a block holds `block_size` rows of
  head_dim, or `block_size * head_dim // width` rows of a narrower store, so every store draws from one free list.
- fixed: the sliding window (sliding_window-1 rows of head_dim), the compressors' open-window buffers (rate-1 rows of
  the projection width, 2x for overlapping compressors) and CSA's overlap series (rate rows, kv and gate). Their size
  does not depend on the length, so each running sequence gets one **state slot** of exactly that size (as vLLM gives
  Mamba state a slot) instead of blocks rounded up per field.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from moemesh.kernels.config import CSA, SLIDING, ModelConfig


class OutOfBlocks(RuntimeError):
    """The cache has no free block (or state slot) for what was asked; nothing was allocated."""


# ---- layout: what one sequence needs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RowStore:
    """One growing store of a sequence: a compressed layer's entries (`kv`) or its CSA indexer's (`index`)."""

    layer: int
    kind: str  # "kv" | "index"
    width: int
    rate: int
    rows_per_block: int

    def rows(self, num_tokens: int) -> int:
        return num_tokens // self.rate

    def blocks(self, num_tokens: int) -> int:
        return -(-self.rows(num_tokens) // self.rows_per_block)


@dataclass(frozen=True)
class SlotField:
    """One fixed-size tensor of a sequence's state slot: `rows` x `width` elements at `offset`."""

    layer: int
    owner: str  # "layer" (LayerCache), "compressor" or "indexer" (CompressorState)
    name: str  # the attribute: window, buf_kv, buf_gate, overlap_kv, overlap_gate
    rows: int
    width: int
    offset: int


@dataclass(frozen=True)
class CacheLayout:
    """Where a model's per-sequence state goes: growing stores (in blocks) and fixed fields (in a slot)."""

    block_size: int
    block_elems: int  # elements of one block: block_size rows of head_dim
    stores: tuple[RowStore, ...]
    fields: tuple[SlotField, ...]
    slot_elems: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, block_size: int) -> CacheLayout:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        block_elems = block_size * cfg.head_dim
        stores, shapes = [], []  # shapes: (layer, owner, name, rows, width)
        for layer, kind in enumerate(cfg.layer_types):
            shapes.append((layer, "layer", "window", cfg.sliding_window - 1, cfg.head_dim))
            if kind == SLIDING:
                continue
            rate = cfg.compress_rate(layer)
            parts = [("compressor", "kv", cfg.head_dim, kind == CSA)]
            if kind == CSA:  # the indexer's own compressor always overlaps
                parts.append(("indexer", "index", cfg.index_head_dim, True))
            for owner, store_kind, out, overlap in parts:
                if out > block_elems:
                    raise ValueError(f"block_size: {block_size} rows of head_dim {cfg.head_dim} cannot hold one "
                                     f"{store_kind} row of width {out}")
                stores.append(RowStore(layer, store_kind, out, rate, block_elems // out))
                width = (2 if overlap else 1) * out  # compressor projections: two series when overlapping
                shapes += [(layer, owner, "buf_kv", rate - 1, width), (layer, owner, "buf_gate", rate - 1, width)]
                if overlap:
                    shapes += [(layer, owner, "overlap_kv", rate, out), (layer, owner, "overlap_gate", rate, out)]
        fields, offset = [], 0
        for layer, owner, name, rows, width in shapes:
            fields.append(SlotField(layer, owner, name, rows, width, offset))
            offset += rows * width
        return cls(block_size, block_elems, tuple(stores), tuple(fields), offset)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a sequence holds once `num_tokens` tokens are in its cache (its state slot not counted)."""
        return sum(s.blocks(num_tokens) for s in self.stores)

    def max_tokens(self, num_blocks: int, limit: int) -> int:
        """The longest sequence (<= limit) whose growing state fits `num_blocks` blocks."""
        if self.blocks_needed(limit) <= num_blocks:
            return limit
        lo, hi = 0, limit  # blocks_needed is monotone: blocks_needed(lo) fits, blocks_needed(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.blocks_needed(mid) <= num_blocks else (lo, mid)
        return lo


# ---- who holds which block -----------------------------------------------------------------------------------
@dataclass
class KVCacheUsage:
    """A snapshot for metrics. `fraction` weighs blocks and slots by their size (= share of the cache's bytes)."""

    used_blocks: int
    total_blocks: int
    used_slots: int
    total_slots: int
    fraction: float


@dataclass
class _Holding:
    slot: int
    tables: list[list[int]] = field(default_factory=list)  # per store of the layout: block ids, in row order


class BlockManager:
    """Plain bookkeeping of a fixed budget of blocks and state slots, keyed by any hashable sequence key.

    A sequence is `admit`ted (takes a slot), `allocate`d for a token count (each store's table grows to cover
    `rows(num_tokens)`; all-or-nothing), and `free`d (every block and the slot return). `grow` serves a single store
    (what `PagedRows.append` asks for when rows arrive beyond what was allocated)."""

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int):
        if num_blocks < 0 or num_slots < 1:
            raise ValueError(f"need num_blocks >= 0 and num_slots >= 1, got {num_blocks} and {num_slots}")
        self.layout, self.num_blocks, self.num_slots = layout, num_blocks, num_slots
        self._free = deque(range(num_blocks))
        self._free_slots = deque(range(num_slots))
        self._held: dict[Hashable, _Holding] = {}
        self._refs = [0] * num_blocks  # holders of each block: sequences' tables and cached prefixes
        self.reclaim: Callable[[int], None] | None = None  # frees unreferenced cached blocks (PrefixCache sets it)

    # -- questions ----------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.layout.blocks_needed(num_tokens)

    def max_tokens(self, limit: int) -> int:
        """The longest sequence (<= limit) that fits the whole budget alone."""
        return self.layout.max_tokens(self.num_blocks, limit)

    def holds(self, key: Hashable) -> bool:
        return key in self._held

    def blocks_held(self, key: Hashable) -> int:
        return sum(len(t) for t in self._held[key].tables)

    def extra_blocks(self, key: Hashable, num_tokens: int) -> int:
        """Blocks `allocate(key, num_tokens)` would take (a sequence not admitted yet holds none)."""
        held = self._held.get(key)
        if held is None:
            return self.layout.blocks_needed(num_tokens)
        return sum(max(0, s.blocks(num_tokens) - len(t)) for s, t in zip(self.layout.stores, held.tables))

    def can_allocate(self, key: Hashable, num_tokens: int, reserve: int = 0) -> bool:
        """Whether `key` (admitted or not) can grow to `num_tokens` and leave `reserve` blocks free."""
        if key not in self._held and not self._free_slots:
            return False
        need = self.extra_blocks(key, num_tokens) + reserve
        self._make_room(need)
        return need <= len(self._free)

    def usage(self) -> KVCacheUsage:
        used_b, used_s = self.num_blocks - len(self._free), self.num_slots - len(self._free_slots)
        be, se = self.layout.block_elems, self.layout.slot_elems
        total = self.num_blocks * be + self.num_slots * se
        return KVCacheUsage(used_b, self.num_blocks, used_s, self.num_slots,
                            (used_b * be + used_s * se) / total if total else 0.0)

    # -- changes ------------------------------------------------------------------------------------------------------
    def admit(self, key: Hashable) -> int:
        """Give `key` a state slot (and empty block tables) -> the slot index."""
        if key in self._held:
            raise ValueError(f"sequence {key!r} is already admitted")
        if not self._free_slots:
            raise OutOfBlocks(f"no free state slot: all {self.num_slots} are held (max_num_seqs)")
        holding = _Holding(self._free_slots.popleft(), [[] for _ in self.layout.stores])
        self._held[key] = holding
        return holding.slot

    def slot(self, key: Hashable) -> int:
        return self._held[key].slot

    def table(self, key: Hashable, store: int) -> list[int]:
        """The live block table of one store (the same list object until `free`)."""
        return self._held[key].tables[store]

    def allocate(self, key: Hashable, num_tokens: int) -> None:
        """Grow every store of `key` to hold the state of `num_tokens` tokens, or raise OutOfBlocks taking nothing."""
        tables = self._held[key].tables
        missing = [max(0, s.blocks(num_tokens) - len(t)) for s, t in zip(self.layout.stores, tables)]
        self._make_room(sum(missing))
        if sum(missing) > len(self._free):
            raise OutOfBlocks(f"sequence {key!r} needs {sum(missing)} more blocks for {num_tokens} tokens, "
                              f"{len(self._free)} of {self.num_blocks} are free")
        for table, k in zip(tables, missing):
            table.extend(self._take() for _ in range(k))

    def grow(self, key: Hashable, store: int, rows: int) -> None:
        """Make one store of `key` hold `rows` rows, or raise OutOfBlocks taking nothing."""
        table = self._held[key].tables[store]
        k = -(-rows // self.layout.stores[store].rows_per_block) - len(table)
        self._make_room(k)
        if k > len(self._free):
            s = self.layout.stores[store]
            raise OutOfBlocks(f"sequence {key!r}: layer {s.layer} {s.kind} rows need {k} more blocks, "
                              f"{len(self._free)} of {self.num_blocks} are free")
        table.extend(self._take() for _ in range(max(k, 0)))

    def free(self, key: Hashable) -> None:
        """Return every block and the slot of `key`."""
        holding = self._held.pop(key, None)
        if holding is None:
            raise ValueError(f"sequence {key!r} holds nothing (never admitted, or already freed)")
        for table in holding.tables:
            self.release(table)
            table.clear()  # a stale PagedRows now fails loudly instead of reading another sequence's rows
        self._free_slots.append(holding.slot)

    # -- sharing (prefix caching) -------------------------------------------------------------------------------------
    def hold(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (a cached prefix, or a sequence that adopted one)."""
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """One holder less for each of `blocks`; a block nobody holds is free again."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def adopt(self, key: Hashable, tables: list[list[int]]) -> None:
        """Start `key`'s (empty) block tables with shared blocks, one list per store (each gets one holder more)."""
        for mine, shared in zip(self._held[key].tables, tables):
            if mine:
                raise ValueError(f"sequence {key!r} already holds blocks: adopt before allocating")
            self.hold(shared)
            mine.extend(shared)

    def take_block(self) -> int:
        """One fresh block (ref 1) outside any table, or OutOfBlocks."""
        self._make_room(1)
        if not self._free:
            raise OutOfBlocks(f"no free block: all {self.num_blocks} are held")
        return self._take()

    def _take(self) -> int:
        b = self._free.popleft()
        self._refs[b] = 1
        return b

    def _make_room(self, need: int) -> None:
        if need > len(self._free) and self.reclaim is not None:
            self.reclaim(need - len(self._free))

    def check(self) -> None:
        """Internal invariants (for tests): a block is free iff nobody holds it; every slot is free or held by exactly
        one sequence."""
        held = {b for h in self._held.values() for t in h.tables for b in t}
        assert not held & set(self._free), "a held block is on the free list"
        assert all((r == 0) == (b in set(self._free)) for b, r in enumerate(self._refs)), "refcount/free list mismatch"
        assert len(self._free) == len(set(self._free)), "block freed twice"
        slots = [h.slot for h in self._held.values()] + list(self._free_slots)
        assert sorted(slots) == list(range(self.num_slots)), "slot double-held or lost"
