"""Checks `moemesh serve` runs before deploying: does the cluster have the accelerators the config asks for?

A role that asks for a device the cluster lacks would otherwise stay pending (Ray waits for a `GPU` that never
comes) or fail inside its process on every restart (`device: cuda` where torch has no CUDA). Both are caught here,
with a message naming the roles, the amounts and what provides them. Pure except `cluster_resources`.
"""

from __future__ import annotations

from collections import Counter

from moemesh.cluster.config import ConfigFileError, DeploymentConfig, Placement
from moemesh.kernels.device import accelerator_shortfall


def _per_process(p: Placement) -> Counter:
    need = Counter({"GPU": p.num_gpus})
    for name in ("NPU",):
        need[name] += p.resources.get(name, 0.0)
    return need


def requested_accelerators(config: DeploymentConfig) -> dict[str, float]:
    """{"GPU": n, "NPU": n}: summed over every process the config starts (attention ranks, expert shards, Engram
    shards; expert replicas the controller may add later are not counted: they are what an autoscaling cluster
    grows for)."""
    total: Counter = Counter()
    for _ in range(config.attention.replicas):
        total += _per_process(config.attention.placement)
    if config.experts.assignment is not None:
        for spec in config.experts.assignment:
            total += _per_process(spec.placement or config.experts.placement)
    else:
        for _ in range(config.experts.shards or 0):
            total += _per_process(config.experts.placement)
    for _ in range(config.engram.shards * config.engram.replicas):
        total += _per_process(config.engram.placement)
    return {name: float(total.get(name, 0.0)) for name in ("GPU", "NPU")}


def check_accelerators(config: DeploymentConfig, available: dict[str, float]) -> None:
    """ConfigFileError when the config's GPUs/NPUs exceed what the cluster (`ray.cluster_resources()`) has."""
    message = accelerator_shortfall(requested_accelerators(config), available)
    if message:
        raise ConfigFileError(f"{message}. Deploy where they exist, or set the roles' placement to `device: cpu` "
                              "without GPU/NPU resources (on a cluster whose autoscaler adds such nodes, pass "
                              "--wait-for-resources)")
