"""A `Plan` -> a `DeploymentConfig` whose every process is pinned to the Ray node the plan chose. Pure: no Ray here.

Pinning uses one custom resource per Ray node, **`moemesh.io/node:<name>`** (value 1), which the cluster config gives
each node (`ray start --resources='{"moemesh.io/node:gpu-017": 1}'`, or `resources:` of a node type in a `ray up`
YAML). Every pinned process asks for `PIN_AMOUNT` of it, so the value 1 admits up to 1,000 processes on a node and
no other node can run them. `node_pin_resources(ray.nodes(), topology)` finds each host's resource on a live cluster.

What the deployment gets (D = devices, H = hosts, R = attention ranks, L = layers, E = experts):
- `experts.assignment`: one shard per device holding replicas, `{layer: [expert ids]}` (each id once per device),
  pinned to the device's host, plus `device_resources` (e.g. `{"GPU": 1}` -> `num_gpus: 1`, `{"NPU": 1}`).
- `attention.replicas = R`, pinned to the ranks' host. One `attention.placement` serves every rank, so all ranks must
  sit on one host (`PlanApplyError` otherwise; plan with `attention_ranks` and `colocate` accordingly).
- `engram`: the plan's Engram copies in the domain that holds the attention ranks (lookups stay in a domain, so
  copies in other domains would serve nobody): `shards` = the plan's shards per copy, `replicas` = its copies, pinned
  to their host (again one placement: they must share a host).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moemesh.cluster.config import ConfigFileError, DeploymentConfig, Placement
from moemesh.cluster.names import attention_worker, engram_shard, expert_shard
from moemesh.cluster.planner.engram import host_levels
from moemesh.cluster.planner.plan import Plan
from moemesh.cluster.planner.topology import LABEL_PREFIX, NODE_TIER, Topology

NODE_RESOURCE_PREFIX = f"{LABEL_PREFIX}{NODE_TIER}:"   # moemesh.io/node:<name>
PIN_AMOUNT = 0.001                                    # of a node's `moemesh.io/node:<name>` (value 1) per process


class PlanApplyError(ValueError):
    """A plan the deployment config cannot express, or one that leaves an expert unplaced."""


def node_resource(name: str) -> str:
    """The custom resource that pins a process to the Ray node called `name`."""
    return f"{NODE_RESOURCE_PREFIX}{name}"


def node_pin_resources(nodes: list[dict], topology: Topology) -> list[str]:
    """[H] the `moemesh.io/node:<name>` resource of each host of a topology discovered from `ray.nodes()` (its
    `host_names` are Ray node ids). Errors name the node that lacks one (or has several)."""
    by_id = {str(n.get("NodeID", "")): n for n in nodes}
    out = []
    for h, node_id in enumerate(topology.host_names):
        node = by_id.get(node_id)
        if node is None:
            raise PlanApplyError(f"host {h}: Ray node {node_id[:12]} is not in the node list")
        found = [r for r in (node.get("Resources") or {}) if r.startswith(NODE_RESOURCE_PREFIX)]
        if len(found) != 1:
            raise PlanApplyError(f"host {h}: Ray node {node_id[:12]} ({node.get('NodeManagerAddress', '?')}) has "
                                 f"{len(found)} {NODE_RESOURCE_PREFIX}<name> resources {found}; the cluster config "
                                 "must give each node exactly one")
        out.append(found[0])
    return out


def _pinned(base: Placement, pin: str, device_resources: dict[str, float]) -> Placement:
    """`base` plus the node pin and the device resources (GPU -> num_gpus/cuda, NPU -> resources/npu)."""
    resources = {**base.resources, pin: PIN_AMOUNT}
    num_gpus, device = base.num_gpus, base.device
    for name, amount in device_resources.items():
        if name == "GPU":
            num_gpus, device = amount, "cuda"
        else:
            resources[name] = amount
            device = "npu" if name == "NPU" else device
    return base.model_copy(update={"resources": resources, "num_gpus": num_gpus, "device": device})


def shard_experts(plan: Plan) -> dict[int, dict[int, list[int]]]:
    """{device: {layer: sorted expert ids}} for every device holding replicas (layers it holds none of left out)."""
    out: dict[int, dict[int, list[int]]] = {}
    for layer in range(plan.replica_expert.shape[0]):
        rep_e, rep_d = plan.replica_expert[layer], plan.replica_device[layer]          # [S]
        for d in np.unique(rep_d):
            out.setdefault(int(d), {})[layer] = sorted({int(e) for e in rep_e[rep_d == d]})
    return dict(sorted(out.items()))


def _check_coverage(shards: dict[int, dict[int, list[int]]], layers: int, experts: int) -> None:
    for layer in range(layers):
        held = {e for s in shards.values() for e in s.get(layer, [])}
        missing = sorted(set(range(experts)) - held)
        if missing:
            raise PlanApplyError(f"plan: layer {layer} experts {missing} have no replica on any device")


def _one_host(role: str, hosts: np.ndarray, topology: Topology) -> int:
    hosts = np.unique(hosts)
    if len(hosts) != 1:
        names = [topology.host_names[h][:12] if topology.host_names else str(h) for h in hosts]
        raise PlanApplyError(f"{role}: the plan puts them on {len(hosts)} hosts {names}, but the deployment config "
                             f"has one placement for all of them; plan them onto one host")
    return int(hosts[0])


def _engram_domain_hosts(plan: Plan, topology: Topology, att_host: int) -> np.ndarray | None:
    """[copies, shards] hosts of the Engram copies in the domain holding `att_host` (None: no Engram tables)."""
    e = plan.engram
    if e is None:
        return None
    return e.host[int(host_levels(topology)[e.level][att_host])]


def plan_to_deployment(plan: Plan, topology: Topology, base: DeploymentConfig, device_resources: dict[str, float],
                       host_resources: Sequence[str] | None = None) -> DeploymentConfig:
    """`base` with its experts, attention ranks and Engram shards placed as `plan` says (see the module docstring).

    device_resources: Ray resources one device's process asks for, e.g. `{"GPU": 1}`, `{"NPU": 1}`; `{}` on CPU.
    Colocated attention and expert processes each ask for it, so use fractions (0.5) when they share devices.
    host_resources: [H] the pin resource of each host; default `moemesh.io/node:<host name>` (`host_names`, else the
    host index). From a live cluster: `node_pin_resources(ray.nodes(), topology)`."""
    if plan.topology.n_devices != topology.n_devices:
        raise PlanApplyError(f"topology: {topology.n_devices} devices, the plan was made for "
                             f"{plan.topology.n_devices}")
    H = topology.n_hosts
    pins = list(host_resources) if host_resources is not None else \
        [node_resource(topology.host_names[h] if topology.host_names else str(h)) for h in range(H)]
    if len(pins) != H:
        raise PlanApplyError(f"host_resources: {len(pins)} names for {H} hosts")
    L, E = plan.shape.layers, plan.shape.experts

    # Step 1: expert shards, one per device that holds replicas.
    shards = shard_experts(plan)
    _check_coverage(shards, L, E)
    assignment = [{"experts": held, "placement": _pinned(base.experts.placement, pins[topology.host[d]],
                                                         device_resources).model_dump()}
                  for d, held in shards.items()]

    # Step 2: attention ranks, all on one host.
    att_host = _one_host("attention ranks", topology.host[plan.attention_device], topology)
    attention = base.attention.model_copy(update={
        "replicas": len(plan.attention_device),
        "placement": _pinned(base.attention.placement, pins[att_host], device_resources)})

    # Step 3: Engram copies of the attention ranks' domain, on one host (host DRAM: no device resources).
    engram = base.engram
    hosts = _engram_domain_hosts(plan, topology, att_host)                               # [copies, shards]
    if hosts is not None:
        e_host = _one_host("engram shards", hosts.ravel(), topology)
        engram = engram.model_copy(update={"shards": hosts.shape[1], "replicas": hosts.shape[0],
                                           "placement": _pinned(base.engram.placement, pins[e_host], {})})

    data = base.model_dump()
    data.update(attention=attention.model_dump(), engram=engram.model_dump(),
                experts={**base.experts.model_dump(exclude={"shards", "assignment"}), "assignment": assignment})
    try:
        config = DeploymentConfig.model_validate(data)
        config.experts.resolve(list(range(L)), E)
    except (ValueError, ConfigFileError) as e:
        raise PlanApplyError(f"plan -> deployment: {e}") from None
    return config


def expected_nodes(config: DeploymentConfig) -> dict[str, str]:
    """{Serve deployment name: pin resource} of every pinned expert shard, attention worker and Engram shard of a
    config built by `plan_to_deployment` (what a placement check compares `node_id()` against)."""
    def pin(p: Placement) -> str | None:
        return next((r for r in p.resources if r.startswith(NODE_RESOURCE_PREFIX)), None)

    out = {expert_shard(i): pin(s.placement) for i, s in enumerate(config.experts.assignment or [])}
    out.update({attention_worker(k): pin(config.attention.placement) for k in range(config.attention.replicas)})
    out.update({engram_shard(s, r): pin(config.engram.placement) for s in range(config.engram.shards)
                for r in range(config.engram.replicas)})
    return {name: res for name, res in out.items() if res is not None}
