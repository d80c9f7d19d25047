"""MoE dispatch from an attention worker: which shard computes which (token, expert), and the all-to-all itself.

Each token is sent once per destination shard, however many of its top-k experts live there; the shard returns the
token's weighted sum over those experts, so combine is one add per destination. When an expert has replicas on
several shards, a token's slot goes to replica `token_index mod replicas` (spreads load, deterministic).
Shapes: N = tokens of the step, k = experts per token, D = hidden, E = routed experts, R = replicas.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from moemesh.proto.codec import TokenBatch
from moemesh.proto.transport import ExpertTransport

ShardId = Hashable


@dataclass(frozen=True)
class ExpertMap:
    """Versioned map: for each MoE layer, the shards holding each expert. Swapped whole (never edited in place), so a
    step sees one consistent version."""

    version: int
    shards: tuple[ShardId, ...]
    holder_table: dict[int, torch.Tensor]  # layer -> [E, R] shard positions, -1 padded
    holder_count: dict[int, torch.Tensor]  # layer -> [E]

    @classmethod
    def from_assignment(cls, assignment: Sequence[dict[int, Sequence[int]]], n_experts: int,
                        shard_ids: Sequence[ShardId] | None = None, version: int = 0) -> "ExpertMap":
        """`assignment[i]` = {layer: expert ids} held by shard i (named `shard_ids[i]`, default i)."""
        shard_ids = tuple(shard_ids if shard_ids is not None else range(len(assignment)))
        if len(shard_ids) != len(assignment):
            raise ValueError(f"shard_ids: {len(shard_ids)} names for {len(assignment)} shards")
        layers = sorted({layer for held in assignment for layer in held})
        tables, counts = {}, {}
        for layer in layers:
            holders = [[s for s, held in enumerate(assignment) if e in set(held.get(layer, ()))]
                       for e in range(n_experts)]
            orphans = [e for e, h in enumerate(holders) if not h]
            if orphans:
                raise ValueError(f"assignment: layer {layer} experts {orphans} are held by no shard")
            width = max(len(h) for h in holders)
            tables[layer] = torch.tensor([h + [-1] * (width - len(h)) for h in holders], dtype=torch.long)
            counts[layer] = torch.tensor([len(h) for h in holders], dtype=torch.long)
        return cls(version, shard_ids, tables, counts)

    def route(self, layer: int, indices: torch.Tensor) -> dict[ShardId, tuple[torch.Tensor, torch.Tensor]]:
        """indices [N, k] -> {shard: (token positions [n], expert ids [n, k] with -1 where another shard does it)}."""
        if layer not in self.holder_table:
            raise ValueError(f"layer: {layer} has no experts in expert map version {self.version}")
        idx = indices.cpu()
        token = torch.arange(idx.shape[0]).unsqueeze(-1)  # [N, 1]
        replica = token % self.holder_count[layer][idx]  # [N, k]
        choice = self.holder_table[layer][idx, replica]  # [N, k] shard positions
        routes = {}
        for pos in choice.unique().tolist():
            mine = choice == pos
            tokens = mine.any(dim=1).nonzero().squeeze(-1)
            routes[self.shards[pos]] = (tokens, torch.where(mine, idx, -1)[tokens])
        return routes


@dataclass
class DispatchStats:
    """Plain counters (exported as metrics by the worker): per (layer, expert) tokens, per shard bytes/messages."""

    tokens_per_expert: Counter = field(default_factory=Counter)  # (layer, expert) -> tokens
    bytes_to: Counter = field(default_factory=Counter)  # shard -> bytes sent
    bytes_from: Counter = field(default_factory=Counter)  # shard -> bytes received
    messages_to: Counter = field(default_factory=Counter)  # shard -> messages


class Dispatcher:
    """The all-to-all of one MoE layer, through whichever transport the worker was given."""

    def __init__(self, transport: ExpertTransport, expert_map: ExpertMap):
        self.transport, self.expert_map, self.stats = transport, expert_map, DispatchStats()

    def swap_map(self, expert_map: ExpertMap) -> None:
        """Install a new expert map; steps already dispatching keep the version they started with."""
        self.expert_map = expert_map

    async def __call__(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       step_id: int = 0) -> torch.Tensor:
        """x [N, D], indices [N, k], weights [N, k] -> Σ over each token's experts of w·expert(x)  [N, D]."""
        emap = self.expert_map
        routes = emap.route(layer, indices)
        weights = weights.float()
        batches = {shard: TokenBatch(layer, x[tok], ids, weights[tok], step_id=step_id,
                                     expert_map_version=emap.version)
                   for shard, (tok, ids) in routes.items()}
        replies = await asyncio.gather(*(self.transport.dispatch(s, b) for s, b in batches.items()))
        out = torch.zeros_like(x)
        for (shard, (tok, _)), reply in zip(routes.items(), replies):
            out.index_add_(0, tok.to(x.device), reply.to(device=x.device, dtype=x.dtype))
            self._count(shard, batches[shard], reply)
        self._count_experts(layer, indices)
        return out

    def _count(self, shard: ShardId, batch: TokenBatch, reply: torch.Tensor) -> None:
        self.stats.bytes_to[shard] += batch.nbytes
        self.stats.bytes_from[shard] += reply.numel() * reply.element_size()
        self.stats.messages_to[shard] += 1

    def _count_experts(self, layer: int, indices: torch.Tensor) -> None:
        ids, counts = indices.reshape(-1).unique(return_counts=True)
        for e, c in zip(ids.tolist(), counts.tolist()):
            if e >= 0:
                self.stats.tokens_per_expert[(layer, e)] += c
