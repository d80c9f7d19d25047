"""The attention worker's paged KV cache: every sequence's DeepSeek-V4 state in pool tensors allocated once.

`PagedKVCache` holds two pools, blocks [B, E] for the growing compressed entries and state slots [S, E] for the
fixed-size state (window, compressor buffers, overlaps), as laid out by `blocks.CacheLayout`, and builds the
model's own `SequenceCache` types over them: `PagedRows` (GrowableRows' interface; rows gathered through the block
table) for entries, slot views for the rest. `DeepseekV4.step` runs on them unchanged.
Shapes: B = blocks, R = rows per block of a store, W = a store's row width, S = state slots, E = elements.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from moemesh.actors.attention.blocks import BlockManager, CacheLayout, KVCacheUsage, OutOfBlocks
from moemesh.actors.attention.prefix_cache import CachedPrefix
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.decode_state import CompressorState, LayerCache, SequenceCache

__all__ = ["KVCacheUsage", "OutOfBlocks", "PagedKVCache", "PagedRows", "PagedSequenceCache"]


class PagedRows:
    """`GrowableRows`' interface (`append`, `view`, `n`, `nbytes`) over rows that live in the shared block pool.

    pool [B, R, W] (a view of the block storage for this width); `table` is the store's live block table; `grow(rows)`
    makes the table cover that many rows (raising OutOfBlocks, with nothing changed, when the budget is spent)."""

    def __init__(self, pool: torch.Tensor, table: list[int], grow: Callable[[int], None]):
        self._pool, self._table, self._grow = pool, table, grow
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        """rows [k, W]."""
        k = rows.shape[0]
        if k == 0:
            return
        self._grow(self.n + k)
        R = self._pool.shape[1]
        pos = torch.arange(self.n, self.n + k)
        blocks = torch.tensor(self._table, dtype=torch.long)[pos // R]
        self._pool[blocks.to(self._pool.device), (pos % R).to(self._pool.device)] = rows
        self.n += k

    def view(self) -> torch.Tensor:
        """[n, W]: the rows gathered through the block table (a copy)."""
        R, W = self._pool.shape[1], self._pool.shape[2]
        used = torch.tensor(self._table[: -(-self.n // R)], dtype=torch.long, device=self._pool.device)
        return self._pool[used].reshape(-1, W)[: self.n]

    def nbytes(self) -> int:
        return self.n * self._pool.shape[2] * self._pool.element_size()

    @property
    def blocks(self) -> list[int]:
        return list(self._table)


class _SlotRows:
    """A fixed-capacity tensor field in a state slot, replaced wholesale: `set(t)` copies t [k <= rows, W] in,
    `get()` is a view of the first k rows (valid until the next `set`), or None while unset."""

    def __init__(self, region: torch.Tensor):
        self._region, self._n = region, None

    def get(self) -> torch.Tensor | None:
        return None if self._n is None else self._region[: self._n]

    def set(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._n = None
            return
        if value.dim() != 2 or value.shape[0] > self._region.shape[0] or value.shape[1] != self._region.shape[1]:
            raise RuntimeError(f"state slot field of {tuple(self._region.shape)} cannot take {tuple(value.shape)}: "
                               "the model's cache shapes changed without CacheLayout")
        if value.untyped_storage().data_ptr() == self._region.untyped_storage().data_ptr():
            value = value.clone()  # a view of the slot itself
        self._region[: value.shape[0]].copy_(value)
        self._n = value.shape[0]


class _InSlot:
    """Data descriptor: a tensor attribute of the model's cache dataclasses that lives in a state slot."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        slot = obj._slot_fields.get(self.name)
        return None if slot is None else slot.get()

    def __set__(self, obj, value):
        slot = obj._slot_fields.get(self.name)
        if slot is not None:
            slot.set(value)
        elif value is not None:  # e.g. an overlap series on an HCA layer, which the layout gave no room
            raise RuntimeError(f"state slot has no field {self.name!r} here: the model's cache changed without "
                               "CacheLayout")


class PagedCompressorState(CompressorState):
    """`CompressorState` whose entries are `PagedRows` and whose buffers/overlaps live in the state slot."""

    buf_kv, buf_gate, overlap_kv, overlap_gate = _InSlot(), _InSlot(), _InSlot(), _InSlot()

    def __init__(self, entries: PagedRows, fields: dict[str, _SlotRows]):
        self._slot_fields = fields
        super().__init__(entries=entries)


class PagedLayerCache(LayerCache):
    """`LayerCache` whose window lives in the state slot."""

    window = _InSlot()

    def __init__(self, fields: dict[str, _SlotRows], compressor=None, indexer=None):
        self._slot_fields = fields
        window = fields["window"]._region[:0]
        super().__init__(window=window, compressor=compressor, indexer=indexer)


@dataclass
class PagedSequenceCache(SequenceCache):
    """The model's `SequenceCache`, backed by a `PagedKVCache`; `key` names it in the block manager."""

    key: Hashable = None
    slot_rows: list = field(default_factory=list)  # its `_SlotRows`, in `CacheLayout.fields` order


class PagedKVCache:
    """Pool tensors for every sequence's state + the `BlockManager` deciding who holds what.

    Give either `num_blocks` or `memory_bytes` (then `max_num_seqs` slots are carved out first and the rest becomes
    blocks). `new_sequence()` returns a `SequenceCache` the model steps on as it is; `free` returns its memory."""

    def __init__(self, cfg: ModelConfig, num_blocks: int | None = None, memory_bytes: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 8, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_snapshots: int = 0):
        if (num_blocks is None) == (memory_bytes is None):
            raise ValueError("PagedKVCache: give exactly one of num_blocks and memory_bytes")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        self.config, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.layout = layout = CacheLayout.from_config(cfg, block_size)
        esize = torch.empty(0, dtype=dtype).element_size()
        self.block_bytes, self.slot_bytes = layout.block_elems * esize, layout.slot_elems * esize
        if memory_bytes is not None:
            rest = memory_bytes - max_num_seqs * self.slot_bytes
            num_blocks = max(rest, 0) // self.block_bytes
            if rest < 0 or (num_blocks < 1 and layout.stores):
                raise ValueError(f"memory_bytes: {memory_bytes} B cannot hold {max_num_seqs} state slots of "
                                 f"{self.slot_bytes} B (max_num_seqs) plus one block of {self.block_bytes} B")
        if num_blocks < 0:
            raise ValueError(f"num_blocks: must be >= 0, got {num_blocks}")
        self.manager = BlockManager(layout, num_blocks, max_num_seqs)
        with torch.inference_mode(False):  # normal tensors: writable inside and outside inference mode
            self._blocks = torch.zeros(num_blocks, layout.block_elems, dtype=dtype, device=self.device)  # [B, E]
            self._slots = torch.zeros(max_num_seqs, layout.slot_elems, dtype=dtype, device=self.device)  # [S, E]
            self._snapshots = torch.zeros(num_snapshots, layout.slot_elems, dtype=dtype, device=self.device)
        self._snapshot_meta: dict[int, tuple[list, list]] = {}  # id -> (fields' row counts, layers' engram_conv)
        self._pools = {}  # width -> [B, R, W] view of the block storage
        for s in layout.stores:
            if s.width not in self._pools:
                self._pools[s.width] = self._blocks[:, : s.rows_per_block * s.width].unflatten(
                    1, (s.rows_per_block, s.width))
        self._keys = itertools.count()

    # -- the brief's API ----------------------------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens holds (every layer's compressed + indexer entries)."""
        return self.layout.blocks_needed(num_tokens)

    def can_admit(self, num_tokens: int) -> bool:
        """Whether a new sequence of `num_tokens` tokens fits now (a free slot and enough free blocks)."""
        return self.manager.can_allocate(object(), num_tokens)

    def usage(self) -> KVCacheUsage:
        return self.manager.usage()

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    def nbytes(self) -> int:
        """Bytes of the pool tensors (allocated once)."""
        return self._blocks.numel() * self._blocks.element_size() + self._slots.numel() * self._slots.element_size()

    def new_sequence(self, key: Hashable | None = None) -> PagedSequenceCache:
        """A fresh `SequenceCache` whose state lives here. `key` admitted already (by a scheduler through
        `manager`) is used as is; otherwise it is admitted now (OutOfBlocks when no slot is free)."""
        key = next(self._keys) if key is None else key
        if not self.manager.holds(key):
            self.manager.admit(key)
        slot = self._slots[self.manager.slot(key)]
        fields: dict[tuple[int, str], dict[str, _SlotRows]] = {}
        for f in self.layout.fields:
            region = slot[f.offset: f.offset + f.rows * f.width].view(f.rows, f.width)
            fields.setdefault((f.layer, f.owner), {})[f.name] = _SlotRows(region)
        states: dict[tuple[int, str], PagedCompressorState] = {}
        for i, s in enumerate(self.layout.stores):
            owner = "compressor" if s.kind == "kv" else "indexer"
            grow = (lambda rows, i=i: self.manager.grow(key, i, rows))
            rows = PagedRows(self._pools[s.width], self.manager.table(key, i), grow)
            states[(s.layer, owner)] = PagedCompressorState(rows, fields[(s.layer, owner)])
        layers = [PagedLayerCache(fields[(layer, "layer")], states.get((layer, "compressor")),
                                  states.get((layer, "indexer")))
                  for layer in range(self.config.num_hidden_layers)]
        slot_rows = [fields[(f.layer, f.owner)][f.name] for f in self.layout.fields]
        return PagedSequenceCache(layers=layers, key=key, slot_rows=slot_rows)

    # -- prefix caching -----------------------------------------------------------------------------------------------
    def save_snapshot(self, seq: PagedSequenceCache, snapshot: int) -> None:
        """Copy `seq`'s state slot (and any state outside it) into snapshot `snapshot`."""
        self._snapshots[snapshot].copy_(self._slots[self.manager.slot(seq.key)])
        self._snapshot_meta[snapshot] = ([r._n for r in seq.slot_rows],
                                         [None if l.engram_conv is None else l.engram_conv.clone() for l in seq.layers])

    def restore(self, seq: PagedSequenceCache, prefix: CachedPrefix, copies: list[tuple[int, int]]) -> None:
        """Make a fresh `seq` (whose block tables already start with the prefix's blocks) continue after `prefix`:
        copy the partly filled blocks it got private copies of (`copies`: (source, destination) block ids), its
        rows counts, the snapshot into its slot."""
        if copies:
            src, dst = zip(*copies)
            self._blocks[list(dst)] = self._blocks[list(src)]
        n = prefix.num_tokens
        for s, layer_cache in zip(self.layout.stores, self._stores_of(seq)):
            layer_cache.entries.n = s.rows(n)
        self._slots[self.manager.slot(seq.key)].copy_(self._snapshots[prefix.snapshot])
        counts, convs = self._snapshot_meta[prefix.snapshot]
        for rows, count in zip(seq.slot_rows, counts):
            rows._n = count
        for layer_cache, conv in zip(seq.layers, convs):
            layer_cache.engram_conv = None if conv is None else conv.clone()
        seq.length, seq.token_ids = n, list(prefix.tokens)

    def _stores_of(self, seq: PagedSequenceCache) -> list[CompressorState]:
        """The compressor states of `seq`, in `layout.stores` order."""
        return [getattr(seq.layers[s.layer], "compressor" if s.kind == "kv" else "indexer") for s in self.layout.stores]

    def free(self, seq: PagedSequenceCache | Hashable) -> None:
        """Return every block and the slot of a sequence (its cache object must not be stepped again)."""
        self.manager.free(seq.key if isinstance(seq, PagedSequenceCache) else seq)
