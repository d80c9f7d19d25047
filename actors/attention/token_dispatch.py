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

from moemesh.actors.attention.shard_avoidance import RecoveryConfig, ShardHealth
from moemesh.proto import errors
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
    _healthy_cache: dict = field(default_factory=dict, compare=False, repr=False)  # (layer, avoided) -> tables

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

    def route(self, layer: int, indices: torch.Tensor,
              avoid: frozenset = frozenset()) -> dict[ShardId, tuple[torch.Tensor, torch.Tensor]]:
        """indices [N, k] (-1: a slot to skip) -> {shard: (token positions [n], expert ids [n, k] with -1 where
        another shard does it)}. Shards in `avoid` (unhealthy) get only experts that no other shard holds."""
        if layer not in self.holder_table:
            raise ValueError(f"layer: {layer} has no experts in expert map version {self.version}")
        table, count = self._holders(layer, avoid)
        idx = indices.cpu()
        skip = idx < 0
        safe = idx.clamp(min=0)
        token = torch.arange(idx.shape[0]).unsqueeze(-1)  # [N, 1]
        replica = token % count[safe]  # [N, k]
        choice = torch.where(skip, -1, table[safe, replica])  # [N, k] shard positions
        routes = {}
        for pos in choice.unique().tolist():
            if pos < 0:
                continue
            mine = choice == pos
            tokens = mine.any(dim=1).nonzero().squeeze(-1)
            routes[self.shards[pos]] = (tokens, torch.where(mine, idx, -1)[tokens])
        return routes

    def _holders(self, layer: int, avoid: frozenset) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's holder table and counts without the shards in `avoid`, except where an expert has no other
        holder (it then keeps all of its holders: its tokens wait for the shard to come back)."""
        bad = [pos for pos, shard in enumerate(self.shards) if shard in avoid] if avoid else []
        if not bad:  # the usual case (every shard healthy): no scan, no copy
            return self.holder_table[layer], self.holder_count[layer]
        key = (layer, tuple(bad))
        if key not in self._healthy_cache:
            rows = []
            for row in self.holder_table[layer].tolist():
                held = [p for p in row if p >= 0]
                rows.append([p for p in held if p not in bad] or held)
            width = max(len(r) for r in rows)
            self._healthy_cache[key] = (torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long),
                                        torch.tensor([len(r) for r in rows], dtype=torch.long))
        return self._healthy_cache[key]


@dataclass
class DispatchStats:
    """Plain counters (exported as metrics by the worker): per (layer, expert) tokens, per shard bytes/messages."""

    tokens_per_expert: Counter = field(default_factory=Counter)  # (layer, expert) -> tokens
    bytes_to: Counter = field(default_factory=Counter)  # shard -> bytes sent
    bytes_from: Counter = field(default_factory=Counter)  # shard -> bytes received
    messages_to: Counter = field(default_factory=Counter)  # shard -> messages
    seconds_to: Counter = field(default_factory=Counter)  # shard -> summed round-trip seconds of answered messages


class Dispatcher:
    """The all-to-all of one MoE layer, through whichever transport the worker was given.

    Fault tolerance (docs/reliability.md): a shard answering UNAVAILABLE is marked down (`health`); its tokens are
    sent again at once to other shards holding the same experts, and tokens whose experts only it holds wait for it
    (bounded backoff, its address re-resolved through the transport's resolver) for up to `recovery.deadline_s`.
    Dispatch is idempotent, so a token computed twice is harmless."""

    def __init__(self, transport: ExpertTransport, expert_map: ExpertMap, recovery: RecoveryConfig | None = None):
        self.transport, self.expert_map, self.stats = transport, expert_map, DispatchStats()
        self.health = ShardHealth(transport, recovery)
        self._in_flight: Counter = Counter()  # map version -> layer dispatches under way with it

    def swap_map(self, expert_map: ExpertMap) -> None:
        """Install a new expert map; layer dispatches already under way keep the version they started with."""
        self.expert_map = expert_map

    def versions_in_use(self) -> list[int]:
        """Map versions that dispatches still under way were routed with (a shard dropped from the map may stop
        once no version that holds it is in use here)."""
        return sorted(self._in_flight)  # versions whose count drops to 0 are deleted

    async def __call__(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       step_id: int = 0) -> torch.Tensor:
        """x [N, D], indices [N, k], weights [N, k] -> Σ over each token's experts of w·expert(x)  [N, D]."""
        emap = self.expert_map
        self._in_flight[emap.version] += 1
        try:
            return await self._dispatch(emap, layer, x, indices, weights, step_id)
        finally:
            self._in_flight[emap.version] -= 1
            if not self._in_flight[emap.version]:
                del self._in_flight[emap.version]

    async def _dispatch(self, emap: ExpertMap, layer: int, x: torch.Tensor, indices: torch.Tensor,
                        weights: torch.Tensor, step_id: int) -> torch.Tensor:
        out, loop = torch.zeros_like(x), asyncio.get_running_loop()
        deadline, pause = loop.time() + self.health.config.deadline_s, self.health.config.backoff_s
        positions, ids, failed_shards, w = None, indices, set(), weights.float()  # None: every row of x, in order
        while True:
            down = self.health.down
            routes = emap.route(layer, ids, avoid=down)
            waiting = [s for s in routes if s in down]
            if failed_shards and waiting:  # some experts have no healthy holder: wait for their shard to return
                if loop.time() + pause >= deadline:
                    raise errors.Unavailable(f"expert shards {sorted(map(str, waiting))} did not come back within "
                                             f"{self.health.config.deadline_s:g} s (layer {layer})")
                await asyncio.sleep(pause)
                pause = min(2 * pause, self.health.config.max_backoff_s)
                await asyncio.gather(*(self.transport.refresh(s, self.health.config.probe_timeout_s)
                                       for s in waiting))
            failed = await self._round(layer, emap, x, w, positions, routes, out, step_id)
            if not failed:
                if failed_shards:
                    self.health.recovered(failed_shards, rerouted=not waiting)
                break
            failed_shards |= {shard for shard, _, _ in failed}  # the next round carries only their tokens
            positions = torch.cat([rows for _, rows, _ in failed])
            ids = torch.cat([sub for _, _, sub in failed])
        self._count_experts(layer, indices)
        return out

    async def _round(self, layer: int, emap: ExpertMap, x: torch.Tensor, weights: torch.Tensor,
                     positions: torch.Tensor | None, routes: dict, out: torch.Tensor, step_id: int) -> list:
        """Send one round (the tokens at `positions` of x, or all of x, routed by `routes` by their index within the
        round), add the answers into `out` -> [(shard, rows of x, expert ids)] of the shards that were UNAVAILABLE."""
        sent = {shard: (tok if positions is None else positions[tok], ids) for shard, (tok, ids) in routes.items()}
        batches = {shard: TokenBatch(layer, x[rows], ids, weights[rows], step_id=step_id,
                                     expert_map_version=emap.version)
                   for shard, (rows, ids) in sent.items()}
        replies = await asyncio.gather(*(self._timed(s, b) for s, b in batches.items()), return_exceptions=True)
        failed = []
        for (shard, (rows, ids)), reply in zip(sent.items(), replies):
            if isinstance(reply, (errors.Unavailable, TimeoutError)):  # gone (or hung): not the request's fault
                self.health.mark_down(shard, reply)
                failed.append((shard, rows, ids))
                continue
            if isinstance(reply, BaseException):
                raise reply
            reply, seconds = reply
            self.health.answered(shard)
            out.index_add_(0, rows.to(x.device), reply.to(device=x.device, dtype=x.dtype))
            self._count(shard, batches[shard], reply, seconds)
        return failed

    async def _timed(self, shard: ShardId, batch: TokenBatch) -> tuple[torch.Tensor, float]:
        """One message's reply and its round-trip seconds (what an operator compares before/after a replica)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        reply = await self.transport.dispatch(shard, batch)
        return reply, loop.time() - start

    def _count(self, shard: ShardId, batch: TokenBatch, reply: torch.Tensor, seconds: float) -> None:
        self.stats.seconds_to[shard] += seconds
        self.stats.bytes_to[shard] += batch.nbytes
        self.stats.bytes_from[shard] += reply.numel() * reply.element_size()
        self.stats.messages_to[shard] += 1

    def _count_experts(self, layer: int, indices: torch.Tensor) -> None:
        ids, counts = indices.reshape(-1).unique(return_counts=True)
        for e, c in zip(ids.tolist(), counts.tolist()):
            if e >= 0:
                self.stats.tokens_per_expert[(layer, e)] += c
