"""Checks `moemesh serve` runs before deploying: does the cluster have the accelerators the config asks for?

A role that asks for a device the cluster lacks would otherwise stay pending (Ray waits for a `GPU` that never
comes) or fail inside its process on every restart (`device: cuda` where torch has no CUDA). Both are caught here,
with a message naming the roles, the amounts and what provides them. Pure except `cluster_resources`.
"""

from __future__ import annotations

from collections import Counter

from moemesh.cluster.config import ConfigFileError, DeploymentConfig, Placement

ACCELERATORS = ("GPU", "NPU")  # the Ray resources that hand a process a device (cuda, npu)
HINT = {"GPU": "a CUDA build of torch on nodes with NVIDIA GPUs",
        "NPU": "torch_npu + CANN on Ascend nodes (Ray advertises `NPU` there)"}


def _per_process(p: Placement) -> Counter:
    return Counter({"GPU": p.num_gpus, "NPU": p.resources.get("NPU", 0.0)})


def requested_accelerators(config: DeploymentConfig) -> dict[str, float]:
    """{"GPU": n, "NPU": n}: summed over every process the config starts (attention ranks, expert shards, Engram
    shards; expert replicas the controller may add later are not counted: they are what an autoscaling cluster
    grows for; the attention pool counts with its `min_replicas`, the replicas that must always run)."""
    total: Counter = Counter()
    pool = config.attention.autoscaling
    for _ in range(config.attention.replicas + (pool.min_replicas if pool is not None else 0)):
        total += _per_process(config.attention.placement)
    for placement in config.experts.shard_placements():
        total += _per_process(placement)
    for _ in range(config.engram.shards * config.engram.replicas):
        total += _per_process(config.engram.placement)
    return {name: float(total.get(name, 0.0)) for name in ACCELERATORS}


def accelerator_shortfall(requested: dict[str, float], available: dict[str, float]) -> str | None:
    """{"GPU": n, "NPU": n} asked for against what the cluster has (`ray.cluster_resources()`) -> None if they fit,
    else a message naming what is missing."""
    short = {name: (need, available.get(name, 0.0)) for name, need in requested.items()
             if name in ACCELERATORS and need > available.get(name, 0.0) + 1e-9}
    return "; ".join(f"the config requests {need:g} {name} but the cluster has {have:g} (needs {HINT[name]})"
                     for name, (need, have) in short.items()) or None


def check_accelerators(config: DeploymentConfig, available: dict[str, float]) -> None:
    """ConfigFileError when the config's GPUs/NPUs exceed what the cluster (`ray.cluster_resources()`) has."""
    message = accelerator_shortfall(requested_accelerators(config), available)
    if message:
        raise ConfigFileError(f"{message}. Deploy where they exist, or set the roles' placement to `device: cpu` "
                              "without GPU/NPU resources (on a cluster whose autoscaler adds such nodes, pass "
                              "--wait-for-resources)")
