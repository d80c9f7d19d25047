"""An attention worker: one data-parallel rank of a disaggregated deployment.

It holds everything but the routed experts and the Engram tables (embeddings, attention and its paged KV cache,
norms, mHC, router, shared expert, Engram gates, LM head), runs the continuous-batching engine, and reaches the expert
shards and Engram shards over gRPC. A plain class: the builder makes it a Serve deployment; it implements the
ingress's `Worker` protocol (generate / load / abort) with plain-data deltas so they cross process boundaries.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from moemesh.actors.attention.engine import AsyncEngine, CacheConfig, Engine
from moemesh.actors.attention.grammar import grammar_for
from moemesh.actors.attention.remote_step import RemoteStep, StepParts
from moemesh.actors.attention.scheduler import SchedulerConfig
from moemesh.actors.attention.shard_avoidance import RecoveryConfig
from moemesh.actors.attention.token_dispatch import Dispatcher, ExpertMap
from moemesh.actors.engram.client import EngramClient, EngramClientConfig, EngramRoute, GrpcEngramTransport, replica_id
from moemesh.actors.io_loop import IoLoop
from moemesh.actors.request import RequestParams
from moemesh.actors.role_metrics import WorkerCollector, engram_latency_histogram, role_registry, serve_registry
from moemesh.kernels.device import resolve_device
from moemesh.kernels.model import load_model
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.transport import ExpertTransport, GrpcTransport, Resolver


class AttentionWorker:
    """`expert_addresses[i]` serves `expert_assignment[i]` ({layer: experts}); `engram_routes` lists
    (row ranges {layer: (start, end)}, [replica addresses]) per Engram shard. `security`: the cluster token and TLS
    the shards' servers expect (default: neither). `expert_resolver` / `engram_resolver`: where shard i / Engram
    replica `engram-{s}-{r}` listens now (awaitable `host:port`); with them, a shard that Serve restarted on a new
    port is found again, and steps wait for it (bounded, `recovery`) instead of failing (docs/reliability.md).
    `transport_factory`: the gRPC expert transport -> the one to dispatch with (default: it as is)."""

    def __init__(self, model_dir: str, expert_addresses: Sequence[str],
                 expert_assignment: Sequence[Mapping[int, Sequence[int]]],
                 engram_routes: Sequence[tuple[Mapping[int, Sequence[int]], Sequence[str]]] = (), *,
                 max_num_seqs: int = 32, kv_cache_blocks: int = 4096, block_size: int = 16,
                 dtype: str = "float32", device: str = "cpu", engram_cache_rows: int = 65536, micro_batches: int = 2,
                 security: GrpcSecurity | None = None, expert_resolver: Resolver | None = None,
                 engram_resolver: Resolver | None = None, recovery: RecoveryConfig | None = None,
                 transport_factory: Callable[[GrpcTransport], ExpertTransport] | None = None):
        self.model = load_model(model_dir, dtype=getattr(torch, dtype), device=resolve_device(device),
                                with_experts=False, with_engram_tables=False)
        cfg = self.model.config
        self.io = IoLoop("attention-worker-io")
        assignment = [{int(k): list(v) for k, v in held.items()} for held in expert_assignment]
        self._base_assignment = assignment  # shards 0..n-1: always in the map (a restarted worker starts with them)
        recovery = recovery or RecoveryConfig()
        transport = GrpcTransport(dict(enumerate(expert_addresses)), security=security, resolver=expert_resolver)
        if transport_factory is not None:  # e.g. a HybridTransport: collectives to some shards, this for the rest
            transport = transport_factory(transport)
        self.dispatcher = Dispatcher(transport, ExpertMap.from_assignment(assignment, cfg.n_routed_experts),
                                     recovery)
        self.engram = None
        if cfg.has_engram:
            routes, addresses = [], {}
            for s, (ranges, replicas) in enumerate(engram_routes):
                names = [replica_id(s, r) for r in range(len(replicas))]
                addresses.update(zip(names, replicas))
                routes.append(EngramRoute({int(k): tuple(v) for k, v in ranges.items()}, names))
            self.engram = EngramClient(cfg, routes, GrpcEngramTransport(addresses, security=security,
                                                                        resolver=engram_resolver),
                                       EngramClientConfig(cache_rows=engram_cache_rows, wait_for_restart=True,
                                                          timeout_s=recovery.deadline_s,
                                                          restart_backoff_s=recovery.backoff_s))
        self.registry = role_registry()
        self.registry.register(WorkerCollector(self, Path(model_dir).resolve().name))
        self.step_parts = StepParts()
        self.step = step = RemoteStep(self.model, self.dispatcher, self.engram.lookup if self.engram else None, self.io,
                          timeout_s=2 * recovery.deadline_s + 60,  # an Engram wait, then a layer's, at most
                          engram_latency=engram_latency_histogram(self.registry), micro_batches=micro_batches,
                          on_step=self.step_parts.add)
        engine = Engine(self.model, CacheConfig(block_size=block_size, num_blocks=kv_cache_blocks),
                        SchedulerConfig(max_num_seqs=max_num_seqs), model_step=step,
                        grammar=grammar_for(model_dir, cfg))
        self.engine = AsyncEngine(engine)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict) -> AsyncIterator[dict]:
        """Stream `Delta`s (token ids; the ingress detokenizes and cuts at stop strings) as dicts. Stopping the
        iteration (client gone, stop string found) frees the request's KV blocks."""
        async for out in self.engine.generate(request_id, prompt_token_ids, RequestParams(**params)):
            yield asdict(out.delta())

    def set_micro_batches(self, n: int) -> int:
        """Change how many micro-batches the coming steps are split into (1 = no overlap) -> the value in force. For
        `moemesh bench serve`, which compares settings on one running deployment."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"micro_batches: an integer >= 1, got {n!r}")
        self.step.micro_batches = n
        return n

    def last_step_trace(self) -> dict:
        """The last step's timeline (`RemoteStep.last_trace`) with its shape: {sequences, tokens, micro_batches,
        events: [[kind, micro-batch, layer, start s, end s]]} (docs/serving.md's overlap picture)."""
        seqs, tokens = self.step.last_shape
        return {"sequences": seqs, "tokens": tokens, "micro_batches": self.step.last.micro_batches,
                "events": [list(e) for e in self.step.last_trace]}

    async def load(self) -> float:
        stats = self.engine.engine.stats()
        return float(stats.num_running + stats.num_waiting)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict:
        """Engine, dispatch and Engram counters (for metrics and tests)."""
        out = {"engine": asdict(self.engine.engine.stats()), "step": self.step_parts.seconds(self.engine.engine.clock),
               "messages_to": dict(self.dispatcher.stats.messages_to),
               "tokens_per_expert": {f"{l}/{e}": n for (l, e), n in self.dispatcher.stats.tokens_per_expert.items()}}
        by_link = getattr(self.dispatcher.transport, "messages", None)  # a HybridTransport's replies per link kind
        if by_link is not None:
            out["messages_by_link"] = dict(by_link)
        if self.engram is not None:
            c = self.engram.counters
            out["engram"] = {"lookups": c.lookups, "cache_hits": c.cache_hits, "cache_misses": c.cache_misses,
                             "hit_rate": c.hit_rate, "failovers": c.failovers}
        out["faults"] = {"experts": list(self.dispatcher.health.events),
                         "engram": list(self.engram.events) if self.engram is not None else []}
        return out

    # ---- the expert map, changed live by the expert controller (cluster/control/controller.py) -----------------------
    async def expert_map_state(self) -> dict:
        """{version, in_use: map versions that dispatches under way were routed with, shards: extra shards known}."""
        emap = self.dispatcher.expert_map
        in_use = await self._on_io(self.dispatcher.versions_in_use)
        extra = [s for s in emap.shards if not isinstance(s, int)]
        return {"version": emap.version, "in_use": in_use, "shards": extra}

    async def _on_io(self, fn):
        """`fn()` (awaited if it is a coroutine function) run on the I/O loop, which owns the dispatcher and its
        transport: dispatches update their counters and channels there."""
        async def call():
            out = fn()
            return await out if asyncio.iscoroutine(out) else out
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.io.loop))

    async def install_expert_map(self, version: int, replicas: dict[str, dict], addresses: dict[str, str]) -> int:
        """Switch to map `version`: the base shards plus `replicas` ({replica name: {layer: expert ids}}, reached at
        `addresses[name]`). Layer dispatches under way finish with the map they started with. A version not newer
        than the one in force is ignored (the controller re-sends after a worker restart) -> the version in force."""
        current = self.dispatcher.expert_map
        if version <= current.version:
            return current.version
        names = sorted(replicas)
        missing = [n for n in names if n not in addresses]
        if missing or any(isinstance(n, int) or not n for n in names):
            raise ValueError(f"replicas: names must be non-empty strings with an address, got {names} "
                             f"(no address for {missing})")
        held = [{int(k): [int(e) for e in v] for k, v in replicas[n].items()} for n in names]
        emap = ExpertMap.from_assignment(self._base_assignment + held, self.model.config.n_routed_experts,
                                         list(range(len(self._base_assignment))) + names, version=version)

        def swap():
            for name in names:
                self.dispatcher.transport.add(name, addresses[name])
            self.dispatcher.swap_map(emap)
        await self._on_io(swap)
        return version

    async def release_shards(self, names: list[str]) -> list[str]:
        """Close the channels of replicas no longer in the map in force -> the names released (those still in the
        map are kept)."""
        in_map = set(self.dispatcher.expert_map.shards)
        gone = [n for n in names if n not in in_map and not isinstance(n, int)]

        async def close():
            for name in gone:
                await self.dispatcher.transport.remove(name)
        await self._on_io(close)
        return gone

    async def expert_loads(self) -> dict[str, int]:
        """Tokens routed to each expert since start, `"layer/expert" -> tokens` (cumulative; the controller takes
        differences)."""
        counts = await self._on_io(lambda: dict(self.dispatcher.stats.tokens_per_expert))
        return {f"{layer}/{e}": n for (layer, e), n in counts.items()}

    async def dispatch_latency(self) -> dict[str, list[float]]:
        """Per expert shard since start, `shard -> [messages answered, their summed round-trip seconds]` (cumulative;
        base shards by position as a string, replicas by name). The controller turns differences into the mean
        dispatch latency to an expert's holders before and after it changes them."""
        def read():
            d = self.dispatcher.stats
            return {str(s): [d.messages_to[s], d.seconds_to[s]] for s in d.messages_to}
        return await self._on_io(read)

    def start_metrics(self, host: str) -> str:
        """Serve this worker's Prometheus metrics on a free port; returns `host:port`."""
        return serve_registry(self.registry, host)

    async def shutdown(self) -> None:
        await self.engine.shutdown()
        self.io.close()
