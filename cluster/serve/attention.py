"""Attention workers as Serve replicas: the fixed ranks (`attention-worker-{k}`) and the autoscaled pool
(`attention-pool`). The classes resolve shard handles to gRPC addresses, then are plain `AttentionWorker`s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from moemesh.actors.attention.worker import AttentionWorker
from moemesh.actors.engram.client import replica_id
from moemesh.cluster.names import (
    ATTENTION_POOL,
)
from moemesh.cluster.serve.collective import CollectiveSpec
from moemesh.cluster.serve.edge import RESOLVE_TIMEOUT_S, RoleEdge
from moemesh.cluster.serve.hosts import bind_address
from moemesh.cluster.serve.pool_policy import RecentTtft, pool_stats
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.collective import CollectiveTransport
from moemesh.proto.hybrid import HybridTransport

EXPERT_MAP_SYNC_S = 2.0  # a pool replica asks the expert controller for the map in force this often
log = logging.getLogger(__name__)


class AttentionWorkerReplica(RoleEdge, AttentionWorker):
    """Resolves the shards' handles to gRPC addresses, then is a plain AttentionWorker. It keeps the handles: a shard
    that Serve restarts may listen on another port, and the worker asks its handle again (`_resolver`)."""

    async def __init__(self, model_dir: str, expert_handles: list, expert_assignment: list,
                       engram_handles: list[list], engram_ranges: list, settings: dict, host: str,
                       security: GrpcSecurity | None = None, collective: CollectiveSpec | None = None,
                       rank: int = 0):
        experts = [await h.grpc_address.remote() for h in expert_handles]
        factory = None if collective is None else await self._collective(collective, rank, expert_handles[0])
        routes = [(ranges, [await h.grpc_address.remote() for h in replicas])
                  for ranges, replicas in zip(engram_ranges, engram_handles)]
        self._resolve_pool = ThreadPoolExecutor(2, thread_name_prefix="resolve")  # never blocks the I/O loop's pool
        engram_by_name = {replica_id(s, r): h for s, replicas in enumerate(engram_handles)
                          for r, h in enumerate(replicas)}
        AttentionWorker.__init__(self, model_dir, experts, expert_assignment, routes, security=security,
                                 expert_resolver=self._resolver(dict(enumerate(expert_handles))),
                                 engram_resolver=self._resolver(engram_by_name), transport_factory=factory,
                                 **settings)
        self.metrics_address = self.start_metrics(bind_address(host))

    @staticmethod
    async def _collective(spec: CollectiveSpec, rank: int, store_handle):
        """Join the group (first start only) -> a factory wrapping the gRPC transport in a HybridTransport that
        reaches every base shard over the group (gRPC stays for the rest, and for a shard whose link breaks), or
        None: gRPC only."""
        if not spec.first_start(rank):
            return None
        try:
            address = await asyncio.wait_for(store_handle.collective_store.remote(), spec.timeout_s)
        except Exception as e:  # noqa: BLE001 - gRPC only
            log.warning("collective group %s: no store address from shard 0 (%r); gRPC only", spec.group_id, e)
            return None
        group = await asyncio.to_thread(spec.join, rank, address) if address else None
        if group is None:
            return None
        shards = {i: i for i in range(spec.shards)}
        return lambda grpc_part: HybridTransport(dict.fromkeys(shards, "collective"), grpc_transport=grpc_part,
                                                 collective=CollectiveTransport(group, shards))

    def _resolver(self, handles: dict):
        """name -> awaitable `host:port` from the named shard's handle (blocking `.result` in a small pool of its
        own: the worker's I/O loop is not the replica's loop). Callers bound it with their own timeout."""
        async def resolve(name) -> str:
            handle = handles[name]
            return await asyncio.get_running_loop().run_in_executor(
                self._resolve_pool, lambda: handle.grpc_address.remote().result(timeout_s=RESOLVE_TIMEOUT_S))
        return resolve


class AttentionPoolReplica(AttentionWorkerReplica):
    """One replica of `attention-pool`: an extra rank that Serve's autoscaler adds and removes. It reports its queue
    and recent p90 TTFT to Serve (`record_autoscaling_stats`, read by cluster/serve/pool_policy.py). With an expert
    controller it pulls the expert map (`_follow_expert_map`): the pool's handle reaches an arbitrary replica, so the
    controller cannot push maps to one pool replica as it does to each fixed rank."""

    async def __init__(self, *args, look_back_s: float, controller=None, **kw):
        await AttentionWorkerReplica.__init__(self, *args, **kw)
        self.ttft = RecentTtft(look_back_s)
        self._follow = None if controller is None else asyncio.get_running_loop().create_task(
            self._follow_expert_map(controller))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict) -> AsyncIterator[dict]:
        start, first = time.monotonic(), True
        deltas = AttentionWorkerReplica.generate(self, request_id, prompt_token_ids, params)
        try:
            async for delta in deltas:
                if first and delta["token_ids"]:
                    self.ttft.add(time.monotonic() - start)
                    first = False
                yield delta
        finally:
            await deltas.aclose()  # closing this stream early frees the sequence now, not when collected

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook, called every few seconds on this replica."""
        return pool_stats(await self.load(), self.ttft.p90())

    async def _follow_expert_map(self, controller) -> None:
        """Every `EXPERT_MAP_SYNC_S`: send this replica's map state and expert loads to the controller, which answers
        with the map in force (`pool_sync`, docs/serving.md); install it when newer, and close the channels to replicas
        that left the map once no dispatch runs under an older one. Until the first answer the base shards serve
        every expert, which is always correct."""
        name = f"{ATTENTION_POOL}#{serve.get_replica_context().replica_id.unique_id}"
        added: set[str] = set()
        failing = None
        while True:
            try:
                state, loads = await self.expert_map_state(), await self.expert_loads()
                current = await controller.pool_sync.remote(name, state, loads, await self.dispatch_latency())
                if current["version"] > state["version"]:
                    await self.install_expert_map(current["version"], current["replicas"], current["addresses"])
                    added |= set(current["replicas"])
                elif all(v >= state["version"] for v in state["in_use"]):
                    added -= set(await self.release_shards(sorted(added - set(current["replicas"]))))
                failing = None
            except Exception as e:  # noqa: BLE001 - retried; the map in force stays correct meanwhile
                if repr(e) != failing:
                    log.warning("%s: expert map sync failed (retrying every %gs): %r", name, EXPERT_MAP_SYNC_S, e)
                failing = repr(e)
            await asyncio.sleep(EXPERT_MAP_SYNC_S)

