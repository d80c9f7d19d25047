"""The ingress as a Serve replica: the plain `Ingress` over Serve handles of the attention workers (and the pool)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from ray import serve
from ray.serve.schema import ReplicaState

from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.generation import WorkerLost
from moemesh.actors.ingress.protocol import IngressLimits
from moemesh.actors.ingress.text import TextCodec
from moemesh.actors.request import Delta
from moemesh.cluster.names import (
    ATTENTION_POOL,
    attention_worker,
)
from moemesh.cluster.serve.edge import WORKER_LOST, RoleEdge
from moemesh.kernels.config import ModelConfig

WAKE_TIMEOUT_S = 600.0  # how long the ingress's call that starts an empty pool may wait for its first replica
log = logging.getLogger(__name__)


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
    """The ingress's `ElasticWorker` (actors/ingress/generation.py) over the `attention-pool` handle. Serve picks the
    pool replica of each sequence (its own queue-length routing); this class counts what it streams there and how many
    replicas run.

    - `load()`: this ingress's sequences on the pool per running replica (the ingress is the pool's only client);
    - `replicas()`: RUNNING replicas as `count()` reports them, re-read in the background at most every `refresh_s`;
    - `wake()`: one `load` call that waits at the handle for a replica: a request queued at a deployment with no
      replica is what makes Serve's autoscaler start one at once;
    - `abort()`: nothing is sent (the call would reach an arbitrary replica, and start one on an empty pool): the
      stream's cancellation (`HandleWorker.generate`) stops the sequence on its replica."""

    def __init__(self, handle, spill_at: float, count: Callable[[], Awaitable[int]], name: str = ATTENTION_POOL,
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
class IngressReplica(RoleEdge, Ingress):
    """The HTTP app over the attention workers' handles (and the pool's, spilled to above `spill_at` sequences per
    fixed rank), plus `/metrics/targets`: Prometheus HTTP service discovery of every role's metrics endpoint
    (`role_handles`: all other deployments but the pool, whose handle reaches an arbitrary replica)."""

    def __init__(self, model_dir: str, worker_handles: list, role_handles: list, model_name: str | None,
                 limits: dict, api_keys: list[str] = (), public_metrics: bool = False, pool_handle=None,
                 spill_at: float = 0.0):
        config = ModelConfig.from_file(model_dir)
        workers = [HandleWorker(h, attention_worker(k)) for k, h in enumerate(worker_handles)]
        if pool_handle is not None:
            app = serve.get_replica_context().app_name
            workers.append(PoolWorker(pool_handle, spill_at, lambda: _running_replicas(app, ATTENTION_POOL)))
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

