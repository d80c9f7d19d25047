"""Prefix-aware routing: send a request to the attention worker most likely to hold its prompt's prefix in its prefix
cache (actors/attention/prefix_cache.py), unless that worker is much busier than the least loaded one.

The ingress cannot see the workers' caches; it remembers where it sent prompts. `PrefixAffinity` cuts a prompt into
blocks of `block_tokens` tokens (the engine's `prefix_block_tokens`, so a remembered prefix is one a worker may have
cached), hashes the chain of blocks (h_i = hash(h_{i-1}, block i)) and maps each hash to the worker that was last
sent a prompt with that prefix, in a bounded LRU map. A request goes to the worker of its longest remembered prefix
when that worker answers and its load is at most `spill` above the least loaded worker's; otherwise (no remembered
prefix, worker gone or too busy) it goes by load, and the chosen worker becomes the prefix's owner. A guess, not a
promise: the worker may have evicted the prefix since (the request is then simply computed in full).

Plain bookkeeping, no I/O: `LeastLoadedRouter` (generation.py) calls it with the loads it gathered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


class PrefixRoutingConfig(BaseModel):
    """How the ingress routes by prefix (docs/serving.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    block_tokens: int = Field(64, ge=1, description="Prefix granularity in tokens; match the workers' "
                                                    "cache.prefix_block_tokens.")
    spill: float = Field(4.0, ge=0, description="Follow a prefix to its worker only while that worker's load "
                                                "(running + waiting sequences) is at most this above the least "
                                                "loaded worker's; else route by load.")
    capacity: int = Field(65536, ge=1, description="Prefix hashes remembered (least recently used forgotten).")
    max_blocks: int = Field(64, ge=1, description="Blocks of a prompt's start that are hashed (bounds the work per "
                                                  "request; longer prompts are told apart by their first blocks).")


class PrefixAffinity:
    """The bounded map prefix hash -> worker index, and the choice it implies (see the module docstring)."""

    def __init__(self, config: PrefixRoutingConfig | None = None):
        self.config = config or PrefixRoutingConfig()
        self._owner: OrderedDict[int, int] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._owner)

    def chain(self, prompt: Sequence[int]) -> list[int]:
        """Hashes of the prompt's whole-block prefixes, shortest first (at most `max_blocks`)."""
        g, out, h = self.config.block_tokens, [], 0
        for end in range(g, min(len(prompt), g * self.config.max_blocks) + 1, g):
            h = hash((h, tuple(prompt[end - g:end])))
            out.append(h)
        return out

    def prefer(self, hashes: Sequence[int], candidates: Sequence[int], loads: Sequence[float | None]) -> int | None:
        """The worker of the longest remembered prefix among `hashes` whose worker is a candidate with a load within
        `spill` of the least loaded candidate's; None: route by load."""
        if not candidates:
            return None
        best = min(loads[i] for i in candidates)
        for h in reversed(hashes):
            owner = self._owner.get(h)
            if owner in candidates and loads[owner] <= best + self.config.spill:
                return owner
        return None

    def record(self, hashes: Sequence[int], worker: int) -> None:
        """`worker` now holds (or computes) these prefixes."""
        for h in hashes:
            self._owner[h] = worker
            self._owner.move_to_end(h)
        while len(self._owner) > self.config.capacity:
            self._owner.popitem(last=False)

    def forget(self, worker: int) -> None:
        """Drop every prefix of `worker` (it was lost: a restarted worker starts with an empty cache)."""
        for h in [h for h, w in self._owner.items() if w == worker]:
            del self._owner[h]
