"""Engram client: the attention worker's side of the Engram service.

`EngramClient.lookup({layer: hash_ids [N, O*H]})` returns `{layer: rows [N, E]}`, exactly what `EngramMemory.lookup`
gives with the full local table. Per call it (1) turns per-head indices into global rows of each layer's stacked
table (head j's index + the sum of the earlier heads' table sizes) and de-duplicates them, (2) serves the rows it can
from a bounded LRU cache of hot rows (`RowCache`; hot N-grams are Zipf-distributed), (3) fetches the misses from the
shards whose row ranges hold them, one call per shard carrying every layer, all shards concurrently, each call under
a deadline with failover to another replica of the same ranges on UNAVAILABLE / deadline (a replica that failed sits
out a cool-down), and (4) reassembles the rows in request order.

Transports (`EngramTransport`): `InProcessEngramTransport` calls `EngramShard` objects directly; `GrpcEngramTransport`
talks to `serve_engram_shard` servers over `grpc.aio`. Both raise the same exceptions (proto/errors.py).

Shapes: N = tokens, O = N-gram orders, H = hash heads per order, W = head_dim, E = engram_dim = O*H*W,
U = distinct rows of a layer in one call. See docs/engram_service.md.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import grpc
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from moemesh.actors.engram.service import RowRange
from moemesh.kernels.config import ModelConfig
from moemesh.kernels.engram import engram_table_sizes
from moemesh.proto import codec, engram_pb2_grpc, errors
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.codec import EngramLookup
from moemesh.proto.transport import DEFAULT_MAX_MESSAGE_BYTES, ChannelPool, Resolver, reconnect_options

ReplicaId = Hashable  # a shard replica as the plan names it (an int index or a name)


def replica_id(shard: int, replica: int) -> str:
    """The client's name for replica `replica` of Engram shard `shard` (what its resolver is asked about)."""
    return f"engram-{shard}-{replica}"


# ---- transports -----------------------------------------------------------------------------------------------------

class EngramTransport(ABC):
    """Asks one Engram shard replica for global rows of several layers."""

    @abstractmethod
    async def lookup(self, replica: ReplicaId, row_ids: dict[int, torch.Tensor], *, timeout_s: float,
                     request_id: str = "") -> dict[int, torch.Tensor]:
        """{layer: int64 [m] global rows} -> {layer: rows [m, W]} in the shard's dtype (read-only). Raises the
        shard's exceptions; `errors.Unavailable` / `TimeoutError` when the replica cannot answer in `timeout_s`."""

    async def refresh(self, replica: ReplicaId, timeout_s: float) -> bool:
        """Ask where `replica` listens now and reconnect there if it moved -> True if the address changed (a
        transport without a resolver: False)."""
        return False

    async def close(self) -> None:
        """Release connections. The transport is unusable afterwards."""


class LookupTarget(Protocol):
    """What the in-process transport calls: `actors.engram.service.EngramShard` satisfies it."""

    def lookup_many(self, row_ids: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]: ...


class InProcessEngramTransport(EngramTransport):
    """Calls shard objects living in this process: no copies, no serialization (`timeout_s` unused: calls are
    synchronous)."""

    def __init__(self, shards: Mapping[ReplicaId, LookupTarget]):
        self.shards = dict(shards)

    async def lookup(self, replica, row_ids, *, timeout_s, request_id=""):
        target = self.shards.get(replica)
        if target is None:
            raise ValueError(f"replica: unknown Engram replica {replica!r}; known: {sorted(map(str, self.shards))}")
        return target.lookup_many(row_ids)


class GrpcEngramTransport(EngramTransport):
    """Calls Engram shard servers: one `grpc.aio` channel per replica (opened on first use, in the running event
    loop), one attempt per call (failover is the client's job), failures mapped by `errors.exception_for`.
    `security`: the cluster token sent on every call and TLS (default: neither), as the shards' servers expect."""

    def __init__(self, addresses: Mapping[ReplicaId, str], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 reconnect_backoff_s: float = 0.1, security: GrpcSecurity | None = None,
                 resolver: Resolver | None = None):
        self.security = security or GrpcSecurity()
        # a replica back from its cool-down should be reachable again soon after it is
        options = reconnect_options(max_message_bytes, reconnect_backoff_s, int(reconnect_backoff_s * 8000))
        self.pool = ChannelPool(addresses, self.security, options, resolver, what="replica")

    @property
    def addresses(self) -> dict[ReplicaId, str]:
        return self.pool.addresses

    async def lookup(self, replica, row_ids, *, timeout_s, request_id=""):
        request = codec.encode_lookup(EngramLookup(row_ids, request_id))
        try:
            reply = await self.pool.stub(replica, engram_pb2_grpc.EngramStub).Lookup(
                request, timeout=timeout_s, metadata=self.security.metadata)
        except grpc.aio.UsageError:  # `refresh` closed this channel (the replica moved): the client asks again
            raise errors.Unavailable(f"replica {replica!r}: its channel was replaced (new address)") from None
        except grpc.aio.AioRpcError as e:
            raise errors.exception_for(e.code(), e.details() or "") from None
        return codec.decode_lookup_reply(reply)

    async def refresh(self, replica, timeout_s):
        return await self.pool.refresh(replica, timeout_s)

    async def close(self) -> None:
        await self.pool.close()


# ---- hot-row cache --------------------------------------------------------------------------------------------------
class RowCache:
    """A bounded LRU cache of table rows keyed by int; the rows live in one preallocated [capacity, W] tensor."""

    def __init__(self, capacity: int, width: int, dtype: torch.dtype):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1 row, got {capacity}")
        self.capacity = capacity
        self.rows = torch.empty(capacity, width, dtype=dtype)
        self._slots: OrderedDict[int, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: int) -> bool:
        return key in self._slots

    def get(self, keys: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """-> (hit mask bool [n], the hits' rows [h, W] in key order, a copy). Hits become most recently used."""
        hit, slots = np.zeros(len(keys), dtype=bool), []
        for i, key in enumerate(keys):
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                hit[i] = True
                slots.append(slot)
        return hit, self.rows[torch.tensor(slots, dtype=torch.long)]

    def put(self, keys: Sequence[int], rows: torch.Tensor) -> None:
        """Insert distinct keys with their rows [n, W], evicting the least recently used; only the last `capacity`
        are kept when more are given."""
        keys, rows = list(keys)[-self.capacity:], rows[max(0, len(keys) - self.capacity):]
        slots = []
        for key in keys:
            slot = self._slots.pop(key, None)
            if slot is None:
                slot = self._free.pop() if self._free else self._slots.popitem(last=False)[1]
            self._slots[key] = slot
            slots.append(slot)
        if slots:
            self.rows[torch.tensor(slots, dtype=torch.long)] = rows.to(self.rows.dtype)


# ---- the client -----------------------------------------------------------------------------------------------------
class EngramClientConfig(BaseModel):
    """How an attention worker's Engram client caches, waits and fails over."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cache_rows: int = Field(65536, ge=0, description="Hot rows cached (LRU, all layers together); 0 = no cache.")
    timeout_s: float = Field(5.0, gt=0, description="Deadline of one lookup, failovers included.")
    attempt_timeout_s: float = Field(1.0, gt=0, description="Deadline of one call to one replica.")
    cooldown_s: float = Field(2.0, ge=0, description="How long a replica that failed is tried last.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the returned rows.")
    wait_for_restart: bool = Field(False, description="When no replica of a range answers, re-resolve their "
                                   "addresses and ask again (backoff) until `timeout_s` instead of failing at once.")
    restart_backoff_s: float = Field(0.2, gt=0, description="First pause before asking a range again (doubles, "
                                     "at most 2 s).")
    latency_window: int = Field(1024, gt=0, description="Recent fetch latencies kept in the counters.")


@dataclass(frozen=True)
class EngramRoute:
    """A set of row ranges ({layer: (start, end)}) and the replicas that each serve exactly those ranges."""

    ranges: Mapping[int, RowRange]
    replicas: Sequence[ReplicaId]


@dataclass
class EngramClientCounters:
    """Plain counters for metrics. Rows are counted per layer; hits and misses count distinct rows of a call."""

    lookups: int = 0  # lookup() calls
    rows_requested: int = 0  # per-head rows asked, duplicates included (N * O*H per layer)
    rows_unique: int = 0  # after de-duplication within a call
    cache_hits: int = 0
    cache_misses: int = 0  # distinct rows fetched from shards
    fetches: int = 0  # shard calls that answered
    failovers: int = 0  # replica calls that failed (UNAVAILABLE / deadline) and moved on
    fetch_latency_s: deque = field(default_factory=lambda: deque(maxlen=1024))  # per lookup with misses, newest last

    @property
    def hit_rate(self) -> float:
        asked = self.cache_hits + self.cache_misses
        return self.cache_hits / asked if asked else 0.0


@dataclass
class _LayerPlan:
    """One layer of one call: distinct global rows [U] (sorted), where each asked row sits in them [N*O*H], and
    which of them the cache served with what."""

    n_tokens: int
    device: torch.device
    rows: np.ndarray
    inverse: np.ndarray
    hit: np.ndarray
    hit_rows: torch.Tensor


class EngramClient:
    """Engram rows for an attention worker, from the shards of `routes` through `transport`. Use from one event loop;
    concurrent `lookup` calls are fine (start one as a task before the layer loop to overlap it with compute)."""

    def __init__(self, cfg: ModelConfig, routes: Sequence[EngramRoute], transport: EngramTransport,
                 config: EngramClientConfig | None = None, *, name: str = "engram"):
        self.cfg, self.routes, self.transport = cfg, list(routes), transport
        self.config = config or EngramClientConfig()
        self.dtype = getattr(torch, self.config.dtype)
        self.counters = EngramClientCounters(fetch_latency_s=deque(maxlen=self.config.latency_window))
        self.sizes = {layer: np.array(engram_table_sizes(cfg, layer), dtype=np.int64) for layer in cfg.engram_layer_ids}
        self.offsets = {layer: np.cumsum(s) - s for layer, s in self.sizes.items()}  # head j's first global row
        bases = np.cumsum([0] + [int(s.sum()) for s in self.sizes.values()])
        self._key_base = dict(zip(self.sizes, bases.tolist()))  # cache key = layer base + global row
        self._starts, self._route_of = _routing(cfg, self.sizes, self.routes)
        self.cache = RowCache(self.config.cache_rows, cfg.engram_head_dim, self.dtype) \
            if self.config.cache_rows else None
        self._down_until: dict[ReplicaId, float] = {}
        self._turn = [0] * len(self.routes)
        self._ids = itertools.count()
        self.name = name
        self.events: deque[dict] = deque(maxlen=256)  # lookups that needed failover: wall-clock failure/recovery

    async def lookup(self, hash_ids: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: per-head indices int [N, O*H]} (as `DeepseekV4.engram_hash_ids` gives them) -> {layer: rows
        [N, O*H*W]} in `config.dtype`, on the indices' device. Raises ValueError (bad layer / shape / index),
        errors.Unavailable (no replica of some range answered), TimeoutError (`timeout_s` ran out)."""
        plans = {layer: self._plan(layer, ids) for layer, ids in hash_ids.items()}
        self.counters.lookups += 1
        misses = {layer: p.rows[~p.hit] for layer, p in plans.items() if not p.hit.all()}
        fetched = await self._fetch(misses) if misses else {}
        out = {}
        for layer, p in plans.items():
            unique = torch.empty(len(p.rows), self.cfg.engram_head_dim, dtype=self.dtype)
            unique[torch.from_numpy(p.hit)] = p.hit_rows
            if layer in fetched:
                unique[torch.from_numpy(~p.hit)] = fetched[layer]
                if self.cache is not None:
                    self.cache.put((misses[layer] + self._key_base[layer]).tolist(), fetched[layer])
            out[layer] = unique[torch.from_numpy(p.inverse)].reshape(p.n_tokens, self.cfg.engram_dim).to(p.device)
        return out

    def _plan(self, layer: int, hash_ids) -> _LayerPlan:
        """Validate one layer's indices, de-duplicate their global rows, take what the cache holds."""
        if layer not in self.sizes:
            raise ValueError(f"hash_ids: layer {layer} is not an Engram layer ({list(self.sizes)})")
        t = torch.as_tensor(hash_ids)
        sizes = self.sizes[layer]
        if t.dim() != 2 or t.shape[1] != len(sizes) or t.is_floating_point() or t.is_complex():
            raise ValueError(f"hash_ids[{layer}]: expected integer ids of shape [N, {len(sizes)}], got "
                             f"{list(t.shape)} {t.dtype}")
        ids = t.detach().to("cpu", torch.int64).numpy()
        if ids.size and ((ids < 0).any() or (ids >= sizes).any()):
            raise ValueError(f"hash_ids[{layer}]: an index lies outside its head's table")
        rows, inverse = np.unique(ids + self.offsets[layer], return_inverse=True)
        self.counters.rows_requested += ids.size
        self.counters.rows_unique += len(rows)
        if self.cache is None:
            hit = np.zeros(len(rows), dtype=bool)
            hit_rows = torch.empty(0, self.cfg.engram_head_dim, dtype=self.dtype)
        else:
            hit, hit_rows = self.cache.get((rows + self._key_base[layer]).tolist())
        self.counters.cache_hits += int(hit.sum())
        self.counters.cache_misses += int((~hit).sum())
        return _LayerPlan(t.shape[0], t.device, rows, inverse.reshape(-1), hit, hit_rows)

    async def _fetch(self, misses: dict[int, np.ndarray]) -> dict[int, torch.Tensor]:
        """{layer: sorted distinct global rows [M]} -> {layer: rows [M, W]}: one call per route holding some of them,
        all routes concurrently."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.timeout_s
        parts: dict[int, dict[int, np.ndarray]] = {}  # route -> layer -> mask over the layer's misses
        for layer, rows in misses.items():
            route_of_row = self._route_of[layer][np.searchsorted(self._starts[layer], rows, side="right") - 1]
            for r in np.unique(route_of_row).tolist():
                parts.setdefault(r, {})[layer] = route_of_row == r
        request_id = f"{self.name}-{next(self._ids)}"
        replies = await asyncio.gather(*(
            self._fetch_route(r, {layer: torch.from_numpy(misses[layer][m]) for layer, m in masks.items()},
                              deadline, request_id) for r, masks in parts.items()))
        out = {layer: torch.empty(len(rows), self.cfg.engram_head_dim, dtype=self.dtype)
               for layer, rows in misses.items()}
        for (r, masks), reply in zip(parts.items(), replies):
            for layer, m in masks.items():
                rows = reply.get(layer)
                if rows is None or tuple(rows.shape) != (int(m.sum()), self.cfg.engram_head_dim):
                    raise ValueError(f"reply: route {r} answered layer {layer} with "
                                     f"{None if rows is None else list(rows.shape)}, expected "
                                     f"[{int(m.sum())}, {self.cfg.engram_head_dim}]")
                out[layer][torch.from_numpy(m)] = rows.to(self.dtype)
        self.counters.fetch_latency_s.append(loop.time() - started)
        return out

    async def _fetch_route(self, r: int, row_ids: dict[int, torch.Tensor], deadline: float,
                           request_id: str) -> dict[int, torch.Tensor]:
        """One route's rows from the first of its replicas that answers. With `wait_for_restart`, a route none of
        whose replicas answered is asked again (addresses re-resolved, bounded backoff) until the deadline."""
        loop = asyncio.get_running_loop()
        failures, pause = [], self.config.restart_backoff_s
        while True:
            reply = await self._try_replicas(r, row_ids, deadline, request_id, failures)
            if reply is not None:
                if failures:
                    self.events.append({"route": r, "failed_at": failures[0][0], "recovered_at": time.time(),
                                        "failures": len(failures)})
                return reply
            if not self.config.wait_for_restart or loop.time() + pause >= deadline:
                break
            await asyncio.sleep(pause)
            pause = min(2 * pause, 2.0)
            await asyncio.gather(*(self.transport.refresh(x, self.config.attempt_timeout_s)
                                   for x in self.routes[r].replicas))
        what = f"Engram rows {dict(self.routes[r].ranges)}: no replica answered"
        said = "; ".join(msg for _, msg in failures[-4:]) or "no attempt"
        if deadline - loop.time() <= 0:
            raise TimeoutError(f"{what} within {self.config.timeout_s} s ({said})")
        raise errors.Unavailable(f"{what} ({said})")

    async def _try_replicas(self, r: int, row_ids: dict[int, torch.Tensor], deadline: float, request_id: str,
                            failures: list) -> dict[int, torch.Tensor] | None:
        """Each replica of route r once, in `_replica_order`, until one answers -> its rows, or None (failures
        appended as (wall time, message))."""
        loop = asyncio.get_running_loop()
        for replica in self._replica_order(r):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                reply = await self.transport.lookup(replica, row_ids, request_id=request_id,
                                                    timeout_s=min(remaining, self.config.attempt_timeout_s))
            except (errors.Unavailable, TimeoutError) as e:
                self._down_until[replica] = loop.time() + self.config.cooldown_s
                self.counters.failovers += 1
                failures.append((time.time(), f"{replica!r}: {type(e).__name__}: {e}"))
                continue
            self.counters.fetches += 1
            return reply
        return None

    def _replica_order(self, r: int) -> list[ReplicaId]:
        """Replicas not cooling down first, in turns (spreads load); then the cooling ones, soonest back first."""
        replicas = list(self.routes[r].replicas)
        turn = self._turn[r] % len(replicas)
        self._turn[r] += 1
        replicas = replicas[turn:] + replicas[:turn]
        now = asyncio.get_running_loop().time()
        ready = [x for x in replicas if self._down_until.get(x, 0.0) <= now]
        cooling = sorted((x for x in replicas if x not in ready), key=lambda x: self._down_until[x])
        return ready + cooling

    async def close(self) -> None:
        """Close the transport."""
        await self.transport.close()


def _routing(cfg: ModelConfig, sizes: dict[int, np.ndarray], routes: Sequence[EngramRoute]):
    """Per layer: range starts (sorted) and the route holding each range. Checks that every Engram layer's rows are
    tiled exactly (no gap, no overlap) and that every route has a replica."""
    if not routes:
        raise ValueError("routes: at least one Engram route is needed")
    held: dict[int, list[tuple[int, int, int]]] = {layer: [] for layer in sizes}
    for i, route in enumerate(routes):
        if not route.replicas:
            raise ValueError(f"routes[{i}].replicas: a route needs at least one replica")
        for layer, (start, end) in route.ranges.items():
            if layer not in held:
                raise ValueError(f"routes[{i}].ranges: layer {layer} is not an Engram layer ({list(sizes)})")
            held[layer].append((int(start), int(end), i))
    starts, route_of = {}, {}
    for layer, spans in held.items():
        spans.sort()
        pos = 0
        for start, end, i in spans + [(int(sizes[layer].sum()), None, None)]:
            if start != pos or (end is not None and end <= start):
                raise ValueError(f"routes: layer {layer}'s ranges must tile [0, {int(sizes[layer].sum())}) "
                                 f"exactly; got {[(s, e) for s, e, _ in spans]}")
            pos = end
        starts[layer] = np.array([s for s, _, _ in spans], dtype=np.int64)
        route_of[layer] = np.array([i for _, _, i in spans], dtype=np.int64)
    return starts, route_of
