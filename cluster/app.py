"""Builders: a `DeploymentConfig` -> a Ray Serve application (and `moemesh serve`'s run loop).

Every role is a Serve deployment of one replica, so each process is addressable and Serve restarts what dies:
`expert-shard-{i}`, `engram-shard-{s}-{r}` (shard s, replica r), `attention-worker-{k}` (data-parallel rank k), and
`ingress` (FastAPI, least-loaded routing over the ranks). The one exception is `attention-pool` (with
`attention.autoscaling`): extra ranks as the replicas of one deployment that Serve's autoscaler sizes
(cluster/serve_policy.py); the ingress sees the pool as one more worker and Serve picks its replica per sequence.
Shards report their gRPC address; attention workers then talk to them directly over gRPC, never through Ray,
carrying the deployment's cluster token (generated here unless configured, handed to every shard and worker as an init
argument, i.e. through Ray), over TLS when configured. The classes here only add the Ray edge (handles -> addresses,
node ids) to the plain classes in `moemesh.actors`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ray import exceptions as ray_errors
from ray import serve
from ray.serve import exceptions as serve_errors
from ray.serve.schema import ReplicaState
from torch.distributed import TCPStore

from moemesh.actors.attention_worker import AttentionWorker
from moemesh.actors.engram_service import engram_layout
from moemesh.actors.expert_controller import AutoscalingConfig, ExpertController
from moemesh.actors.generation import Delta, WorkerLost
from moemesh.actors.hosts import EngramShardHost, ExpertShardHost, bind_address
from moemesh.actors.ingress import Ingress
from moemesh.actors.openai_protocol import IngressLimits
from moemesh.actors.role_metrics import role_registry, serve_registry
from moemesh.actors.text_codec import TextCodec
from moemesh.cluster.config import DeploymentConfig, Placement
from moemesh.cluster.serve_policy import POLICY_PATH, RecentTtft, pool_stats
from moemesh.kernels.config import ModelConfig
from moemesh.proto.auth import GrpcSecurity
from moemesh.proto.collective import CollectiveGroup, CollectiveTransport, HybridTransport, init_group

# Every role's process: one torch thread (they share a node's cores with other roles), and glibc's malloc keeps
# multi-MB message buffers instead of mmap/munmap-ing each (measured 30x faster for fresh 2 MiB messages).
ROLE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
RESOLVE_TIMEOUT_S = 2.0  # one address lookup through a handle (a restarting shard has none yet)
# What a handle raises when its replica died or cannot be reached (not the worker's own errors, which are the request's)
WORKER_LOST = (ray_errors.RayActorError, ray_errors.ObjectLostError, serve_errors.ReplicaUnavailableError,
               serve_errors.DeploymentUnavailableError)
TINY_CACHE = Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "models" / "tiny"
APP_NAME = "moemesh"  # the Serve application `moemesh serve` deploys (and removes when it stops)
POOL = "attention-pool"  # the deployment of the attention pool's replicas
EXPERT_MAP_SYNC_S = 2.0  # a pool replica asks the expert controller for the map in force this often
WAKE_TIMEOUT_S = 600.0  # how long the ingress's call that starts an empty pool may wait for its first replica
# Ray's variable: how often a replica pushes its autoscaling stats (Ray's default 10 s); set for pool replicas only
STATS_PUSH_ENV = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"
COLLECTIVE_KV_NAMESPACE = "moemesh-collective"  # Ray KV keys `{group id}/{rank}`: which members have started once
log = logging.getLogger(__name__)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class _RoleEdge:
    """What every replica adds at the Ray edge: its node id and its metrics endpoint for service discovery."""

    metrics_address = ""

    def node_id(self) -> str:
        return _node_id()

    def pid(self) -> int:
        """This replica's process id (fault-injection tests kill exactly this process)."""
        return os.getpid()

    def metrics_target(self) -> dict:
        """One Prometheus HTTP-SD entry: this replica's metrics address, labelled with its deployment."""
        return {"targets": [self.metrics_address], "labels": {"deployment": serve.get_replica_context().deployment}}


# ---- the collective transport (opt-in, `experts.transport: collective`) ------------------------------------------------
@dataclass(frozen=True)
class CollectiveSpec:
    """One process group of the base expert shards (ranks 0..shards-1) and the fixed attention workers (ranks
    shards..world_size-1), made at build time. Shard 0 hosts the rendezvous store and reports its address through
    its handle (`collective_store`). `group_id` is fresh per build: a process joins only on its first start (a
    restarted one cannot rejoin a static group, so it uses gRPC only), which a key per rank in Ray's KV records."""

    group_id: str
    backend: str
    world_size: int
    shards: int
    port: int
    timeout_s: float

    def first_start(self, rank: int) -> bool:
        """True the first time `rank`'s process asks (it joins the group); False after any restart."""
        from ray.experimental import internal_kv

        return not internal_kv._internal_kv_put(f"{self.group_id}/{rank}", "1", overwrite=False,
                                                namespace=COLLECTIVE_KV_NAMESPACE)

    def join(self, rank: int, store_address: str) -> CollectiveGroup | None:
        """`init_group` on a daemon thread, waited for at most `timeout_s` + 10 s (a rendezvous that never completes
        must not hold the process) -> the group, or None (logged: this process uses gRPC only)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        host, port = store_address.rsplit(":", 1)

        def run() -> None:
            try:
                done.set_result(init_group(rank, self.world_size, host, int(port), self.backend,
                                           timeout_s=self.timeout_s, is_master=False))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                done.set_exception(e)
        threading.Thread(target=run, name="moemesh-collective-join", daemon=True).start()
        try:
            return done.result(self.timeout_s + 10)
        except Exception as e:  # noqa: BLE001 - the deployment still works over gRPC
            log.warning("collective group %s: rank %d could not join (%r); using gRPC only", self.group_id, rank, e)
            return None


class ExpertShardReplica(_RoleEdge, ExpertShardHost):
    """An expert shard; with `collective` (base shards only) it also joins the group as `rank`, in the background
    (the workers join once every shard's constructor returned), and serves the workers over it beside gRPC."""

    def __init__(self, model_dir: str, assignment: dict, host: str, collective: CollectiveSpec | None = None,
                 rank: int = 0, store_handle=None, **kw):
        ExpertShardHost.__init__(self, model_dir, assignment, host, **kw)
        self.metrics_address = self.start_metrics(host)
        self._store, self._store_address = None, ""
        if collective is not None and collective.first_start(rank):
            if store_handle is None:  # shard 0: the rendezvous store lives as long as this process
                bound = bind_address(host)
                self._store = TCPStore(bound, collective.port, None, True, timedelta(seconds=collective.timeout_s),
                                       wait_for_workers=False)
                self._store_address = f"{bound}:{self._store.port}"
            threading.Thread(target=self._join_collective, args=(collective, rank, store_handle),
                             name="moemesh-collective", daemon=True).start()

    def collective_store(self) -> str:
        """`host:port` of the group's rendezvous store ("" if this process hosts none: not shard 0, or restarted)."""
        return self._store_address

    def _join_collective(self, spec: CollectiveSpec, rank: int, store_handle) -> None:
        try:
            address = self._store_address or store_handle.collective_store.remote().result(timeout_s=spec.timeout_s)
        except Exception as e:  # noqa: BLE001 - gRPC only
            log.warning("collective group %s: no store address from shard 0 (%r); gRPC only", spec.group_id, e)
            return
        group = spec.join(rank, address) if address else None
        if group is not None:
            self.serve_collective(group, range(spec.shards, spec.world_size))


class EngramShardReplica(_RoleEdge, EngramShardHost):
    def __init__(self, model_dir: str, ranges: dict, host: str, **kw):
        EngramShardHost.__init__(self, model_dir, ranges, host, **kw)
        self.metrics_address = self.start_metrics(host)


class AttentionWorkerReplica(_RoleEdge, AttentionWorker):
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
        engram_by_name = {f"engram-{s}-{r}": h for s, replicas in enumerate(engram_handles)
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
    and recent p90 TTFT to Serve (`record_autoscaling_stats`, read by cluster/serve_policy.py). With an expert
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
        name = f"{POOL}#{serve.get_replica_context().replica_id.unique_id}"
        added: set[str] = set()
        failing = None
        while True:
            try:
                state, loads = await self.expert_map_state(), await self.expert_loads()
                current = await controller.pool_sync.remote(name, state, loads)
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


REPLICA_NAMESPACE = "moemesh-replicas"  # Ray namespace of the controller's replica actors


def replica_actor_name(app_name: str, replica: str) -> str:
    """The Ray actor name of replica `replica` of application `app_name` (`ray.get_actor(name, REPLICA_NAMESPACE)`;
    shown by `ray list actors`)."""
    return f"{app_name}/{replica}"


class RayReplicaBackend:
    """The controller's replica actors as plain Ray actors (an `ExpertShardHost` each), owned by the controller's
    process. They ask for `placement`'s resources: where no node has them free, Ray's autoscaler launches one."""

    def __init__(self, model_dir: str, placement: Placement, host: str, batching: dict, security: GrpcSecurity,
                 app_name: str = "moemesh"):
        self.model_dir, self.placement, self.host = model_dir, placement, host
        self.batching, self.security, self.app_name = batching, security, app_name
        self.handles: dict[str, object] = {}
        self._pending: set[str] = set()

    async def start(self, name: str, assignment: dict, version: int) -> str:
        import ray

        cls = ray.remote(ExpertShardHost).options(
            **self.placement.ray_options(), max_restarts=0, runtime_env={"env_vars": dict(ROLE_ENV)},
            scheduling_strategy="SPREAD", name=replica_actor_name(self.app_name, name), namespace=REPLICA_NAMESPACE)
        handle = cls.remote(self.model_dir, assignment, self.host, device=self.placement.device,
                            batching=self.batching, security=self.security, expert_map_version=version)
        self.handles[name] = handle
        self._pending.add(name)
        try:
            return await handle.grpc_address.remote()
        finally:
            self._pending.discard(name)

    async def stop(self, name: str) -> None:
        import ray

        handle = self.handles.pop(name, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    async def alive(self, name: str) -> bool:
        handle = self.handles.get(name)
        if handle is None:
            return False
        try:
            await asyncio.wait_for(handle.grpc_address.remote(), 10)
        except (asyncio.TimeoutError, *WORKER_LOST):
            return False
        return True

    def pending(self) -> int:
        return len(self._pending)


class HandlePort:
    """A `WorkerPort` over one attention worker's Serve handle."""

    def __init__(self, handle):
        self.handle = handle

    async def expert_loads(self) -> dict:
        return await self.handle.expert_loads.remote()

    async def expert_map_state(self) -> dict:
        return await self.handle.expert_map_state.remote()

    async def install_expert_map(self, version: int, replicas: dict, addresses: dict) -> int:
        return await self.handle.install_expert_map.remote(version, replicas, addresses)

    async def release_shards(self, names: list[str]) -> list[str]:
        return await self.handle.release_shards.remote(names)


class ExpertControllerReplica(_RoleEdge):
    """The expert controller (actors/expert_controller.py) as a one-replica Serve deployment: its loop runs on the
    replica's event loop; `state()` / `tick()` are callable through its handle."""

    async def __init__(self, model_dir: str, worker_handles: list, base_assignment: list, autoscaling: dict,
                       batching: dict, host: str, security: GrpcSecurity):
        cfg = AutoscalingConfig.model_validate(autoscaling)
        n_experts = ModelConfig.from_file(model_dir).n_routed_experts
        backend = RayReplicaBackend(model_dir, cfg.placement, host, batching, security,
                                    serve.get_replica_context().app_name)
        workers = {f"attention-worker-{k}": HandlePort(h) for k, h in enumerate(worker_handles)}
        registry = role_registry()
        self.controller = ExpertController(cfg, base_assignment, n_experts, workers, backend, registry)
        self.metrics_address = serve_registry(registry, bind_address(host))
        self._task = asyncio.get_running_loop().create_task(self.controller.run())

    def state(self) -> dict:
        return self.controller.state()

    def pool_sync(self, name: str, state: dict, loads: dict) -> dict:
        """An `attention-pool` replica's report -> the expert map in force (see ExpertController.pool_sync)."""
        return self.controller.pool_sync(name, state, loads)

    def configure(self, changes: dict) -> dict:
        """Change policy fields live (e.g. `{"max_total_replicas": 0}`) -> the policy in force."""
        return self.controller.configure(**changes).model_dump()

    async def tick(self) -> list[dict]:
        """One controller step now (tests and operators); -> the decisions it applied."""
        from dataclasses import asdict

        return [asdict(d) for d in await self.controller.tick()]

    def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError(f"expert controller loop ended: {self._task.exception()!r}")


class HandleWorker:
    """The ingress's `Worker` protocol over one attention worker's Serve handle. Ray's errors for a replica that died
    (or cannot be reached) become `WorkerLost`, so the ingress re-admits the request elsewhere."""

    def __init__(self, handle, name: str = ""):
        self.handle, self.name = handle, name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name or self.handle!r})"

    async def generate(self, request_id: str, prompt_token_ids: list[int], params) -> AsyncIterator[Delta]:
        stream = self.handle.options(stream=True).generate.remote(request_id, prompt_token_ids, params.model_dump())
        try:
            async for delta in stream:
                yield Delta(**delta)
        except WORKER_LOST as e:
            raise WorkerLost(f"{self!r}: {type(e).__name__}") from e
        finally:
            stream.cancel()  # a no-op once finished; frees the sequence on the worker when the client left early

    async def load(self) -> float:
        return await self.handle.load.remote()

    async def abort(self, request_id: str) -> None:
        await self.handle.abort.remote(request_id)


class PoolWorker(HandleWorker):
    """The ingress's `ElasticWorker` (actors/generation.py) over the `attention-pool` handle. Serve picks the pool
    replica of each sequence (its own queue-length routing); this class counts what it streams there and how many
    replicas run.

    - `load()`: this ingress's sequences on the pool per running replica (the ingress is the pool's only client);
    - `replicas()`: RUNNING replicas as `count()` reports them, re-read in the background at most every `refresh_s`;
    - `wake()`: one `load` call that waits at the handle for a replica: a request queued at a deployment with no
      replica is what makes Serve's autoscaler start one at once;
    - `abort()`: nothing is sent (the call would reach an arbitrary replica, and start one on an empty pool): the
      stream's cancellation (`HandleWorker.generate`) stops the sequence on its replica."""

    def __init__(self, handle, spill_at: float, count: Callable[[], Awaitable[int]], name: str = POOL,
                 refresh_s: float = 1.0):
        super().__init__(handle, name)
        self.spill_at, self._count, self._refresh_s = spill_at, count, refresh_s
        self._replicas, self._in_flight = 0, 0
        self._read_at, self._reading, self._waking = -math.inf, None, None

    def replicas(self) -> int:
        if self._reading is None and time.monotonic() - self._read_at >= self._refresh_s:
            self._reading = asyncio.ensure_future(self._read())
        return self._replicas

    async def _read(self) -> None:
        try:
            self._replicas = int(await self._count())
        except Exception as e:  # noqa: BLE001 - keep the last count; try again at the next ask
            log.warning("%r: reading the replica count failed: %r", self, e)
        finally:
            self._read_at, self._reading = time.monotonic(), None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params) -> AsyncIterator[Delta]:
        self._in_flight += 1
        deltas = HandleWorker.generate(self, request_id, prompt_token_ids, params)
        try:
            async for delta in deltas:
                yield delta
        finally:
            self._in_flight -= 1
            await deltas.aclose()  # cancels the Serve stream now (see HandleWorker.generate)

    async def load(self) -> float:
        return self._in_flight / max(1, self._replicas)

    async def abort(self, request_id: str) -> None:
        return None

    def wake(self) -> None:
        if self._waking is None or self._waking.done():
            self._waking = asyncio.ensure_future(self._wake())

    async def _wake(self) -> None:
        async def call():
            return await self.handle.load.remote()
        try:
            await asyncio.wait_for(call(), WAKE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the next spill wakes it again
            log.warning("%r: waking the pool failed (no replica within %gs?): %r", self, WAKE_TIMEOUT_S, e)
        self._read_at = -math.inf  # a replica answered (or it failed): re-read the count now
        self.replicas()


async def _running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of `app`'s `deployment`, from Serve's controller (`serve.status()`, blocking: in a thread)."""
    status = await asyncio.to_thread(serve.status)
    app_status = status.applications.get(app)
    dep = app_status.deployments.get(deployment) if app_status is not None else None
    return dep.replica_states.get(ReplicaState.RUNNING, 0) if dep is not None else 0


@serve.ingress()
class IngressReplica(_RoleEdge, Ingress):
    """The HTTP app over the attention workers' handles (and the pool's, spilled to above `spill_at` sequences per
    fixed rank), plus `/metrics/targets`: Prometheus HTTP service discovery of every role's metrics endpoint
    (`role_handles`: all other deployments but the pool, whose handle reaches an arbitrary replica)."""

    def __init__(self, model_dir: str, worker_handles: list, role_handles: list, model_name: str | None,
                 limits: dict, api_keys: list[str] = (), public_metrics: bool = False, pool_handle=None,
                 spill_at: float = 0.0):
        config = ModelConfig.from_file(model_dir)
        workers = [HandleWorker(h, f"attention-worker-{k}") for k, h in enumerate(worker_handles)]
        if pool_handle is not None:
            app = serve.get_replica_context().app_name
            workers.append(PoolWorker(pool_handle, spill_at, lambda: _running_replicas(app, POOL)))
        Ingress.__init__(self, TextCodec.from_checkpoint(model_dir), workers,
                         model_name or Path(model_dir).resolve().name, config.max_position_embeddings,
                         IngressLimits(**limits), api_keys=api_keys, public_metrics=public_metrics)
        self.role_handles = role_handles
        self.http_app.add_api_route("/metrics/targets", self.metrics_targets, methods=["GET"])

    async def metrics_targets(self) -> list[dict]:
        return [await h.metrics_target.remote() for h in self.role_handles]

    def faults(self) -> list[dict]:
        """Requests moved off a lost attention worker: worker, tokens so far, wall-clock lost_at / resumed_at."""
        return list(self.router.readmits)


def resolve_model(model: str) -> str:
    """`tiny` -> the built-in model (written once to the cache dir); else a checkpoint directory that must exist."""
    if model == "tiny":
        if not (TINY_CACHE / "config.json").is_file():
            from moemesh.kernels.tiny import write_tiny_model

            write_tiny_model(TINY_CACHE, force=True)
        return str(TINY_CACHE)
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"model: {model!r} is not a checkpoint directory (no config.json)")
    return str(Path(model).resolve())


def _options(name: str, placement: Placement) -> dict:
    opts = placement.ray_options()
    opts["runtime_env"] = {"env_vars": dict(ROLE_ENV)}
    return {"name": name, "num_replicas": 1, "ray_actor_options": opts}


def build_app(config: DeploymentConfig):
    """The Serve application for `config` (its ingress node); bind and run it with `serve.run`."""
    model_dir = resolve_model(config.model)
    mcfg = ModelConfig.from_file(model_dir)
    security = config.grpc_security()  # one cluster token per deploy; every shard and worker gets it
    assignment = config.experts.resolve(list(range(mcfg.num_hidden_layers)), mcfg.n_routed_experts)
    batching = {"max_wait_s": config.experts.batch_wait_ms / 1000, "max_tokens": config.experts.max_batch_tokens}
    att = config.attention
    collective = None
    if config.experts.transport == "collective":
        collective = CollectiveSpec(secrets.token_hex(8), config.experts.collective_backend(),
                                    len(assignment) + att.replicas, len(assignment), config.experts.collective_port,
                                    config.experts.collective_timeout_s)
    experts = []
    for i, (held, place) in enumerate(zip(assignment, config.experts.shard_placements())):
        extra = {} if collective is None else {"collective": collective, "rank": i,
                                               "store_handle": experts[0] if i else None}
        experts.append(serve.deployment(**_options(f"expert-shard-{i}", place))(ExpertShardReplica).bind(
            model_dir, held, config.grpc_host, device=place.device, batching=batching, security=security, **extra))
    ranges = engram_layout(mcfg, config.engram.shards) if mcfg.has_engram else []
    engram = [[serve.deployment(**_options(f"engram-shard-{s}-{r}", config.engram.placement))(EngramShardReplica)
               .bind(model_dir, rng, config.grpc_host, mmap_dir=config.engram.mmap_dir, security=security)
               for r in range(config.engram.replicas)] for s, rng in enumerate(ranges)]
    settings = {"max_num_seqs": att.max_num_seqs, "kv_cache_blocks": att.kv_cache_blocks,
                "block_size": att.block_size, "dtype": att.dtype, "device": att.placement.device,
                "engram_cache_rows": att.engram_cache_rows}
    worker_args = (model_dir, experts, assignment, engram, ranges, settings, config.grpc_host, security)
    workers = [serve.deployment(**_options(f"attention-worker-{k}", att.placement),
                                max_ongoing_requests=4 * att.max_num_seqs)(AttentionWorkerReplica).bind(
        *worker_args, **({} if collective is None else {"collective": collective, "rank": len(assignment) + k}))
               for k in range(att.replicas)]  # the pool's replicas and the controller's actors: gRPC only
    roles = experts + [r for replicas in engram for r in replicas] + workers
    controller = None
    if config.experts.autoscaling is not None:
        controller = serve.deployment(**_options("expert-controller", Placement(num_cpus=0.25)))(
            ExpertControllerReplica).bind(model_dir, workers, assignment, config.experts.autoscaling.model_dump(),
                                          batching, config.grpc_host, security)
        roles.append(controller)
    pool = _attention_pool(config, worker_args, controller) if att.autoscaling is not None else None
    return _ingress(config, model_dir, workers, roles, pool)


def _attention_pool(config: DeploymentConfig, worker_args: tuple, controller):
    """`attention-pool`: extra ranks (`AttentionPoolReplica`) that Serve's autoscaler sizes with moemesh's policy.
    Its replicas push their stats every min(10, look_back_period_s / 2) seconds (Ray's default: 10), so a short
    look-back window is filled with fresh numbers. A replica being removed may finish its sequences for
    `drain_timeout_s` (Serve's graceful shutdown)."""
    att, auto = config.attention, config.attention.autoscaling
    opts = _options(POOL, att.placement)
    del opts["num_replicas"]  # the autoscaler's
    opts["ray_actor_options"]["runtime_env"]["env_vars"][STATS_PUSH_ENV] = str(min(10.0, auto.look_back_period_s / 2))
    opts.update(max_ongoing_requests=4 * att.max_num_seqs, graceful_shutdown_timeout_s=auto.drain_timeout_s,
                autoscaling_config={
                    "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                    "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s,
                    "look_back_period_s": auto.look_back_period_s,
                    "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {
                        "target_queue_per_replica": att.target_queue(), "target_ttft_s": auto.target_ttft_s}}})
    return serve.deployment(**opts)(AttentionPoolReplica).bind(*worker_args, look_back_s=auto.look_back_period_s,
                                                              controller=controller)


def _ingress(config: DeploymentConfig, model_dir: str, workers: list, roles: list, pool=None):
    """The ingress deployment. Serve may run a few more requests than the gate admits (health, metrics, models, and
    the ones the gate refuses at once), so requests above the limits get 429 rather than waiting in Serve's queue.
    A worker counts as full at 2 x max_num_seqs sequences: a running batch and a waiting one. The pool, if any, takes
    work once every fixed rank holds `attention.target_queue()` sequences."""
    ing, limits = config.ingress, config.ingress.limits
    if limits.max_worker_load is None:
        limits = limits.model_copy(update={"max_worker_load": 2.0 * config.attention.max_num_seqs})
    opts = _options("ingress", Placement(num_cpus=0.5))
    return serve.deployment(**opts, max_ongoing_requests=limits.max_in_flight + 100)(IngressReplica).bind(
        model_dir, workers, roles, ing.model_name, limits.model_dump(), ing.api_key_list(), ing.public_metrics,
        pool_handle=pool, spill_at=config.attention.target_queue())


def required_cpus(config: DeploymentConfig) -> float:
    """Logical CPUs the deployment reserves (what a local Ray must offer)."""
    pool = config.attention.autoscaling.max_replicas if config.attention.autoscaling is not None else 0
    return ((config.attention.replicas + pool) * config.attention.placement.num_cpus
            + sum(p.num_cpus for p in config.experts.shard_placements())
            + config.engram.shards * config.engram.replicas * config.engram.placement.num_cpus + 0.5)


def deploy(config: DeploymentConfig, address: str | None = None, wait_for_resources: bool = False) -> str:
    """Connect to Ray at `address` (else at $RAY_ADDRESS; else start a new local Ray, never joining another one that
    runs on this machine), check the cluster has the GPUs/NPUs the config asks for (unless
    `wait_for_resources`: an autoscaling cluster adds them), start Serve's HTTP proxy and deploy; returns the API's
    base URL."""
    import ray

    from moemesh.cluster.preflight import check_accelerators, requested_accelerators

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace="moemesh")
        else:  # a laptop: a new local Ray sized (logically) for every role
            wanted = requested_accelerators(config)
            if not wait_for_resources and any(wanted.values()):  # before starting a local Ray for nothing
                from moemesh.kernels.device import local_accelerators

                check_accelerators(config, local_accelerators())
            # "local": never attach to another Ray that happens to run on this machine (ray.init() alone would)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(required_cpus(config)) + 1),
                     namespace="moemesh")
    if not wait_for_resources:
        check_accelerators(config, ray.cluster_resources())
    serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.ingress.host}:{config.ingress.port}/v1"
