"""The expert controller (cluster/control/controller.py) at the Ray edge: its replica actors as Ray actors, the
workers as Serve handles, the controller itself as a one-replica Serve deployment."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from moemesh.actors.role_metrics import role_registry, serve_registry
from moemesh.cluster.config import Placement
from moemesh.cluster.control.controller import ExpertController, log_decisions
from moemesh.cluster.control.policy import AutoscalingConfig
from moemesh.cluster.names import (
    APP_NAME,
    REPLICA_NAMESPACE,
    attention_worker,
    replica_actor_name,
)
from moemesh.cluster.serve.edge import ROLE_ENV, WORKER_LOST, RoleEdge
from moemesh.cluster.serve.hosts import ExpertShardHost, bind_address
from moemesh.kernels.config import ModelConfig
from moemesh.proto.auth import GrpcSecurity

log = logging.getLogger(__name__)


class RayReplicaBackend:
    """The controller's replica actors as plain Ray actors (an `ExpertShardHost` each), owned by the controller's
    process. They ask for `placement`'s resources: where no node has them free, Ray's autoscaler launches one."""

    def __init__(self, model_dir: str, placement: Placement, host: str, batching: dict, security: GrpcSecurity,
                 app_name: str = APP_NAME):
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

    async def dispatch_latency(self) -> dict:
        return await self.handle.dispatch_latency.remote()


class ExpertControllerReplica(RoleEdge):
    """The expert controller (cluster/control/controller.py) as a one-replica Serve deployment: its loop runs on the
    replica's event loop; `state()` / `tick()` are callable through its handle."""

    async def __init__(self, model_dir: str, worker_handles: list, base_assignment: list, autoscaling: dict,
                       batching: dict, host: str, security: GrpcSecurity):
        log_decisions()  # decision lines at INFO in this replica's log and `moemesh serve`'s output
        cfg = AutoscalingConfig.model_validate(autoscaling)
        n_experts = ModelConfig.from_file(model_dir).n_routed_experts
        backend = RayReplicaBackend(model_dir, cfg.placement, host, batching, security,
                                    serve.get_replica_context().app_name)
        workers = {attention_worker(k): HandlePort(h) for k, h in enumerate(worker_handles)}
        registry = role_registry()
        self.controller = ExpertController(cfg, base_assignment, n_experts, workers, backend, registry)
        self.metrics_address = serve_registry(registry, bind_address(host))
        self._task = asyncio.get_running_loop().create_task(self.controller.run())

    def state(self) -> dict:
        return self.controller.state()

    def pool_sync(self, name: str, state: dict, loads: dict, latency: dict | None = None) -> dict:
        """An `attention-pool` replica's report -> the expert map in force (see ExpertController.pool_sync)."""
        return self.controller.pool_sync(name, state, loads, latency)

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

