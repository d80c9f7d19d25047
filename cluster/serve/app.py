"""Builders: a `DeploymentConfig` -> a Ray Serve application, and `deploy` (what `moemesh serve` calls).

Every role is a Serve deployment of one replica, so each process is addressable and Serve restarts what dies:
`expert-shard-{i}`, `engram-shard-{s}-{r}` (shard s, replica r), `attention-worker-{k}` (data-parallel rank k), and
`ingress` (FastAPI, least-loaded routing over the ranks). The one exception is `attention-pool` (with
`attention.autoscaling`): extra ranks as the replicas of one deployment that Serve's autoscaler sizes
(cluster/serve/pool_policy.py); the ingress sees the pool as one more worker and Serve picks its replica per sequence.
Shards report their gRPC address; attention workers then talk to them directly over gRPC, never through Ray,
carrying the deployment's cluster token (generated here unless configured, handed to every shard and worker as an init
argument, i.e. through Ray), over TLS when configured. The classes here only add the Ray edge (handles -> addresses,
node ids) to the plain classes in `moemesh.actors`.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from ray import serve

from moemesh.actors.engram.service import engram_layout
from moemesh.cluster.config import DeploymentConfig, Placement
from moemesh.cluster.names import (
    APP_NAME,
    ATTENTION_POOL,
    EXPERT_CONTROLLER,
    INGRESS,
    RAY_NAMESPACE,
    attention_worker,
    engram_shard,
    expert_shard,
)
from moemesh.cluster.serve.attention import AttentionPoolReplica, AttentionWorkerReplica
from moemesh.cluster.serve.collective import CollectiveSpec
from moemesh.cluster.serve.controller import ExpertControllerReplica
from moemesh.cluster.serve.edge import ROLE_ENV
from moemesh.cluster.serve.ingress import IngressReplica
from moemesh.cluster.serve.pool_policy import POLICY_PATH
from moemesh.cluster.serve.shards import EngramShardReplica, ExpertShardReplica
from moemesh.kernels.builtin import BUILTIN_MODELS, write_builtin_model
from moemesh.kernels.config import ModelConfig

MODEL_CACHE = Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "models"
# Ray's variable: how often a replica pushes its autoscaling stats (Ray's default 10 s); set for pool replicas only
STATS_PUSH_ENV = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"


def resolve_model(model: str, cache: Path = MODEL_CACHE) -> str:
    """A built-in model's name (`BUILTIN_MODELS`: tiny, v4-flash-mini, v4.1-flash-mini) -> its checkpoint in the
    cache dir, written on first use; else a checkpoint directory that must exist."""
    if model in BUILTIN_MODELS:
        return str(cached_builtin_model(model, cache))
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"model: {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a "
                         "checkpoint directory (no config.json)")
    return str(Path(model).resolve())


def cached_builtin_model(name: str, cache: Path = MODEL_CACHE) -> Path:
    """`cache/name`, written there first if missing. Written beside it and renamed into place, so an interrupted
    write or a second process writing at the same time never leaves a half-written checkpoint under the name."""
    out = cache / name
    if (out / "config.json").is_file():
        return out
    tmp = cache / f".{name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_builtin_model(name, tmp)
    if (out / "config.json").is_file():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)  # a leftover without config.json
    try:
        tmp.rename(out)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


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
    batching = {"max_wait_s": config.experts.batch_wait_ms / 1000, "max_tokens": config.experts.max_batch_tokens,
                "decoded_cache": config.experts.decoded_cache}
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
        experts.append(serve.deployment(**_options(expert_shard(i), place))(ExpertShardReplica).bind(
            model_dir, held, config.grpc_host, device=place.device, batching=batching, security=security, **extra))
    ranges = engram_layout(mcfg, config.engram.shards) if mcfg.has_engram else []
    engram = [[serve.deployment(**_options(engram_shard(s, r), config.engram.placement))(EngramShardReplica)
               .bind(model_dir, rng, config.grpc_host, mmap_dir=config.engram.mmap_dir, security=security)
               for r in range(config.engram.replicas)] for s, rng in enumerate(ranges)]
    settings = {"max_num_seqs": att.max_num_seqs, "kv_cache_blocks": att.kv_cache_blocks,
                "block_size": att.block_size, "dtype": att.dtype, "device": att.placement.device,
                "engram_cache_rows": att.engram_cache_rows, "micro_batches": att.micro_batches}
    worker_args = (model_dir, experts, assignment, engram, ranges, settings, config.grpc_host, security)
    workers = [serve.deployment(**_options(attention_worker(k), att.placement),
                                max_ongoing_requests=4 * att.max_num_seqs)(AttentionWorkerReplica).bind(
        *worker_args, **({} if collective is None else {"collective": collective, "rank": len(assignment) + k}))
               for k in range(att.replicas)]  # the pool's replicas and the controller's actors: gRPC only
    roles = experts + [r for replicas in engram for r in replicas] + workers
    controller = None
    if config.experts.autoscaling is not None:
        controller = serve.deployment(**_options(EXPERT_CONTROLLER, Placement(num_cpus=0.25)))(
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
    opts = _options(ATTENTION_POOL, att.placement)
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
    opts = _options(INGRESS, Placement(num_cpus=0.5))
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
            ray.init(address=address, namespace=RAY_NAMESPACE)
        else:  # a laptop: a new local Ray sized (logically) for every role
            wanted = requested_accelerators(config)
            if not wait_for_resources and any(wanted.values()):  # before starting a local Ray for nothing
                from moemesh.kernels.device import local_accelerators

                check_accelerators(config, local_accelerators())
            # "local": never attach to another Ray that happens to run on this machine (ray.init() alone would)
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(required_cpus(config)) + 1),
                     namespace=RAY_NAMESPACE)
    if not wait_for_resources:
        check_accelerators(config, ray.cluster_resources())
    serve.start(http_options={"host": config.ingress.host, "port": config.ingress.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.ingress.host}:{config.ingress.port}/v1"
