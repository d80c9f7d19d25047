"""Baseline placements, written from their published descriptions, returning the same `Plan` so that one cost
model compares them. All use the `uniform` replica choice rule (a token picks any replica of its expert).

- `round_robin`: slot i of the cluster holds expert i mod E; one EP group over every expert device.
- `eplb_global`: DeepSeek EPLB's global policy: replicate the expert with the highest load per replica, one replica
  at a time, until every slot is used; then pack the replicas onto devices, heaviest first, each to the least
  loaded device that still has a free slot (every device gets the same number).
- `eplb_hierarchical`: DeepSeek EPLB's hierarchical policy: pack expert groups (contiguous blocks of experts) onto
  nodes so that node loads balance; replicate within each node (as above, over the node's slots); pack the node's
  replicas onto its devices. "Node" is the innermost topology tier whose domain count divides the number of
  experts (EPLB itself falls back to the global policy when groups do not divide over nodes; so do we).

Legend: L = layers, E = experts, N = items (experts, groups or replicas), M = packs, S = slots per layer.
"""

from __future__ import annotations

import heapq

import numpy as np

from moemesh.cluster.planner.cost import Grouping
from moemesh.cluster.planner.engram import place_engram
from moemesh.cluster.planner.plan import (
    MemoryBudget,
    Plan,
    PlanError,
    evaluate,
    make_demand,
    place_attention,
    sort_by_device,
)
from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.topology import Topology


# ---- EPLB's two primitives ------------------------------------------------------------------------------------------
def balanced_packing(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """weight [L, N] -> pack index [L, N]: N / num_packs items per pack; items by weight descending each go to the
    lightest pack that still has room (ties: the lower pack index)."""
    L, N = weight.shape
    if N % num_packs:
        raise PlanError(f"balanced_packing: {N} items do not split evenly over {num_packs} packs")
    per_pack = N // num_packs
    out = np.empty((L, N), dtype=np.int64)
    for row in range(L):
        heap = [(0.0, p) for p in range(num_packs)]
        room = [per_pack] * num_packs
        for item in np.argsort(-weight[row], kind="stable"):
            load, p = heapq.heappop(heap)
            out[row, item] = p
            room[p] -= 1
            if room[p]:
                heapq.heappush(heap, (load + float(weight[row, item]), p))
    return out


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [L, E] -> (phy2log [L, num_phy], count [L, E]): every expert once, then each extra replica to the
    expert with the highest load per replica."""
    L, E = weight.shape
    phy2log = np.zeros((L, num_phy), dtype=np.int64)
    phy2log[:, :E] = np.arange(E)
    count = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    for i in range(E, num_phy):
        pick = np.argmax(weight / count, axis=1)
        phy2log[:, i] = pick
        count[rows, pick] += 1
    return phy2log, count


def _pack_replicas(phy2log, count, weight, devices: int) -> np.ndarray:
    """Physical replicas -> devices (0..devices-1) by balanced packing of their per-replica loads."""
    load = np.take_along_axis(weight / count, phy2log, axis=1)
    return balanced_packing(load, devices)


# ---- the baselines ------------------------------------------------------------------------------------------------
def _setup(topology, shape, loads, slots_per_device, attention_ranks, colocate):
    att, mask = place_attention(topology, attention_ranks, colocate)
    demand = make_demand(loads, shape, att, topology.n_devices)
    devices = np.flatnonzero(mask)
    s = int(slots_per_device)
    if s != slots_per_device or s * len(devices) < shape.experts:
        raise PlanError(f"slots_per_device: baselines need a whole number of slots with slots x devices >= experts; "
                        f"got {slots_per_device} x {len(devices)} for {shape.experts} experts")
    return att, mask, demand, devices, s


def _plan(name, topology, shape, demand, att, mask, s, rep_e, rep_d, memory) -> Plan:
    rep_e, rep_d = sort_by_device(rep_e, rep_d, shape.experts)
    D, T = topology.n_devices, topology.n_tiers
    # one EP group; a level per tier (outermost first) so that traffic is counted on the tier it crosses
    levels = (np.zeros(D, dtype=np.int64), *(topology.domain[t] for t in range(T - 2, -1, -1)), np.arange(D))
    grouping = Grouping("network", levels, (*range(T, 0, -1), 0))
    p = Plan(name, topology, shape, demand, att, mask, grouping, float(s), rep_e, rep_d, "uniform")
    p.engram = place_engram(topology, shape, memory)
    p.figures = evaluate(p, None, memory)
    return p


def round_robin(topology: Topology, shape: ModelShape, loads, *, slots_per_device: int,
                attention_ranks: int | None = None, colocate: bool = True,
                memory: MemoryBudget | None = None) -> Plan:
    """Slot i (device i // s) holds expert i mod E, in every layer."""
    att, mask, demand, devices, s = _setup(topology, shape, loads, slots_per_device, attention_ranks, colocate)
    S = s * len(devices)
    rep_e = np.tile(np.arange(S) % shape.experts, (shape.layers, 1))
    rep_d = np.tile(devices[np.arange(S) // s], (shape.layers, 1))
    return _plan("round-robin", topology, shape, demand, att, mask, s, rep_e, rep_d, memory or MemoryBudget())


def eplb_global(topology: Topology, shape: ModelShape, loads, *, slots_per_device: int,
                attention_ranks: int | None = None, colocate: bool = True,
                memory: MemoryBudget | None = None) -> Plan:
    """EPLB global policy over all expert devices."""
    att, mask, demand, devices, s = _setup(topology, shape, loads, slots_per_device, attention_ranks, colocate)
    weight = demand.total
    phy2log, count = replicate_experts(weight, s * len(devices))
    pack = _pack_replicas(phy2log, count, weight, len(devices))
    return _plan("eplb-global", topology, shape, demand, att, mask, s, phy2log, devices[pack], memory or MemoryBudget())


def _eplb_node_tier(topology: Topology, mask: np.ndarray, experts: int) -> int | None:
    for t in range(topology.n_tiers):
        n = topology.n_domains(t)
        per = np.bincount(topology.domain[t], weights=mask, minlength=n)
        if 1 < n and experts % n == 0 and (per == per[0]).all() and per[0] > 0:
            return t
    return None


def eplb_hierarchical(topology: Topology, shape: ModelShape, loads, *, slots_per_device: int,
                      attention_ranks: int | None = None, colocate: bool = True,
                      memory: MemoryBudget | None = None) -> Plan:
    """EPLB hierarchical policy: expert groups -> nodes, replicate within nodes, replicas -> devices."""
    att, mask, demand, devices, s = _setup(topology, shape, loads, slots_per_device, attention_ranks, colocate)
    t = _eplb_node_tier(topology, mask, shape.experts)
    if t is None:
        p = eplb_global(topology, shape, loads, slots_per_device=s, attention_ranks=attention_ranks,
                        colocate=colocate, memory=memory)
        p.planner = "eplb-hier (global)"
        return p
    weight, E, L = demand.total, shape.experts, shape.layers
    nodes = topology.n_domains(t)
    per_node = E // nodes
    node_devices = len(devices) // nodes
    slots_node = s * node_devices
    # Step 1: pack expert groups onto nodes; node n's experts get node-local ids n * per_node + i. V4 routes without
    # expert groups: every expert is its own group (EPLB's best case).
    node_of_expert = balanced_packing(weight, nodes)                             # [L, E]
    log_of_local = np.argsort(node_of_expert, axis=1, kind="stable")             # [L, E] expert of each local id
    # Step 2: replicate within each node, over the node's slots.
    node_weight = np.take_along_axis(weight, log_of_local, 1).reshape(L * nodes, per_node)
    phy2local, count = replicate_experts(node_weight, slots_node)
    # Step 3: pack each node's replicas onto its devices.
    pack = _pack_replicas(phy2local, count, node_weight, node_devices)           # [L * nodes, slots_node]
    node = np.arange(nodes)[None, :, None]
    local_ids = phy2local.reshape(L, nodes, slots_node) + node * per_node
    rep_e = np.take_along_axis(log_of_local, local_ids.reshape(L, -1), 1)
    node_dev = devices.reshape(nodes, node_devices)
    rep_d = node_dev[np.broadcast_to(node, local_ids.shape), pack.reshape(L, nodes, slots_node)].reshape(L, -1)
    return _plan("eplb-hier", topology, shape, demand, att, mask, s, rep_e, rep_d, memory or MemoryBudget())


def baseline_slots(ours: Plan) -> int:
    """Slots per device for the baselines next to our plan: ours rounded up (never less expert memory than ours)."""
    return max(1, int(np.ceil(ours.slots_per_device - 1e-9)))


BASELINES = {"round-robin": round_robin, "eplb-global": eplb_global, "eplb-hier": eplb_hierarchical}
