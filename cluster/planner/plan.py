"""The placement planner: topology + model shape + expert loads -> `Plan`. Pure numpy; no Ray, no gRPC.

One public entry point, `plan(topology, shape, loads, ...)`. Legend: D = devices, H = hosts, R = attention ranks,
L = layers, E = experts, S = replicas (slots) per layer, T = topology tiers.

    Step 1: attention ranks -> devices (spread evenly over the hierarchy), and the demand they send.
    Step 2: EP domain and slots per device: every candidate (a node, an NVLink domain, a supernode slice, ...,
            everything) that fits the memory budget is placed on a few layers and scored by the cost model; the
            fastest wins.
    Step 3: replicas of every layer for the winner (place.place_replicas).
    Step 4: against a previous plan: keep it if the new one is not clearly faster, else move whole device
            contents within a node to keep replicas where they were; count the migration bytes.
    Step 5: Engram shards -> hosts (engram.py).
    Step 6: predicted figures (cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moemesh.cluster.planner.cost import Demand, Grouping, LayerRouting, route_nearest, route_uniform, routing_cost
from moemesh.cluster.planner.engram import EngramPlacement, place_engram
from moemesh.cluster.planner.place import device_caps, groupings, place_replicas
from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.topology import Topology, domain_starts


class PlanError(ValueError):
    """No plan satisfies the inputs (memory, counts); the message says which figure is short."""


class MemoryBudget(BaseModel):
    """What device and host memory may be used for."""

    model_config = ConfigDict(extra="forbid")
    reserve_fraction: float = Field(0.10, ge=0, lt=1, description="Share of device memory kept free (activations, "
                                    "workspace, fragmentation).")
    sequences_per_rank: int = Field(64, ge=0, description="Sequences an attention rank keeps a KV cache for.")
    context_tokens: int = Field(32768, ge=0, description="Average cached tokens per sequence.")
    engram_dram_fraction: float = Field(0.5, gt=0, le=1, description="Share of host DRAM the Engram tables may use.")
    engram_copies: int = Field(1, ge=1, description="Full copies of the Engram tables in each Engram domain.")

    def attention_bytes(self, shape: ModelShape) -> float:
        """Weights + KV cache of one attention rank."""
        kv = self.sequences_per_rank * (shape.kv_bytes_per_sequence + self.context_tokens * shape.kv_bytes_per_token)
        return shape.dense_bytes + kv


@dataclass(frozen=True, eq=False)
class PlanFigures:
    """Predicted figures (means are over layers; bytes are per decode step over all layers)."""

    layer_time: float          # modelled MoE layer time, seconds
    dispatch: float
    expert: float
    combine: float
    compute: float
    hbm: float
    link_time: np.ndarray      # [T] seconds per layer on each tier (worst device)
    balancedness: float        # mean over layers of mean / max tokens over expert devices
    device_tokens: np.ndarray  # [D] token-expert pairs per layer
    tier_bytes: np.ndarray     # [T + 1] dispatch + combine bytes per step; [0] stays on the device
    slowest_tier: int          # topology tier index, -1 if none carries traffic
    slowest_tier_share: float  # share of all dispatched activations that cross the slowest tier
    memory: np.ndarray         # [D] bytes used
    migration_bytes: float     # expert bytes to load relative to the previous plan (all of them without one)


@dataclass(eq=False)
class Plan:
    """Where everything goes, and what it is predicted to cost."""

    planner: str
    topology: Topology
    shape: ModelShape
    demand: Demand                 # the loads planned for; the routing rule is built from them
    attention_device: np.ndarray   # [R] device of each attention rank
    expert_mask: np.ndarray        # [D] devices that hold experts
    grouping: Grouping             # EP domains (expert groups)
    slots_per_device: float        # replicas per device per layer (mean)
    replica_expert: np.ndarray     # [L, S]
    replica_device: np.ndarray     # [L, S]
    routing: str                   # "nearest" | "uniform"
    engram: EngramPlacement | None = None
    figures: PlanFigures | None = field(default=None, repr=False)

    @property
    def expert_groups(self) -> list[np.ndarray]:
        """Devices of each EP group (expert devices only)."""
        g = self.grouping.group
        return [np.flatnonzero((g == i) & self.expert_mask) for i in range(self.grouping.n_groups)]

    def layer_routing(self, layer: int, row: int | None = None) -> LayerRouting:
        """The routing of `layer`'s demand; `row`: its row in the replica arrays when they hold only some layers
        (the planner's candidates), default = layer."""
        route = route_nearest if self.routing == "nearest" else route_uniform
        row = layer if row is None else row
        return route(self.replica_expert[row], self.replica_device[row], self.grouping, self.demand, layer,
                     self.topology.n_tiers)

    def source_routing(self, layer: int, rank: int) -> np.ndarray:
        """[S]: probability that a token of attention rank `rank` for expert replica_expert[layer, s]'s expert
        goes to replica s (sums to 1 over each expert's replicas). The rule an attention worker applies."""
        rep_e, rep_d = self.replica_expert[layer], self.replica_device[layer]
        E, d = self.shape.experts, self.attention_device[rank]
        in_group = self.grouping.group[rep_d] == self.grouping.group[d]
        if self.routing == "uniform":
            c = np.bincount(rep_e[in_group], minlength=E)
            return np.where(in_group, 1.0 / np.maximum(c[rep_e], 1), 0.0)
        r = self.layer_routing(layer)
        prob, keep = np.zeros(len(rep_e)), np.ones(E)
        for lv in r.levels:
            if lv.part is None:
                phi = np.zeros(E)
                on_d = lv.key // E == d
                phi[lv.key[on_d] % E] = lv.phi[on_d]
                mine = rep_d == d
            else:
                phi = lv.phi[lv.part[d]]
                mine = lv.part[rep_d] == lv.part[d]
            w = np.where(mine, lv.cons, 0.0)
            wsum = np.bincount(rep_e, weights=w, minlength=E)
            prob += keep[rep_e] * phi[rep_e] * np.divide(w, wsum[rep_e], out=np.zeros_like(w),
                                                         where=wsum[rep_e] > 0)
            keep *= 1.0 - phi
        return prob


# ---- Step 1: sources -----------------------------------------------------------------------------------------------
def place_attention(topo: Topology, ranks: int | None, colocate: bool) -> tuple[np.ndarray, np.ndarray]:
    """(attention_device [R], expert_mask [D]). Ranks sit at evenly spaced device ids, which spreads them evenly
    over hosts, nodes and supernodes. Colocated: every device also holds experts; else attention devices don't."""
    D = topo.n_devices
    R = D if ranks is None and colocate else ranks
    if R is None:
        raise PlanError("attention_ranks: required when attention and experts do not share devices")
    if not 0 < R <= D or (not colocate and R >= D):
        raise PlanError(f"attention_ranks: {R} does not fit {D} devices"
                        f"{'' if colocate else ' (some must be left for experts)'}")
    att = np.floor((np.arange(R) + 0.5) * D / R).astype(np.int64)
    mask = np.ones(D, dtype=bool)
    if not colocate:
        mask[att] = False
    return att, mask


def make_demand(loads, shape: ModelShape, attention_device: np.ndarray, n_devices: int) -> Demand:
    """loads [L, E] (tokens per expert per step, split evenly over ranks) or [R, L, E] (per source rank)."""
    x = np.asarray(loads, dtype=np.float64)
    L, E, R = shape.layers, shape.experts, len(attention_device)
    if x.shape not in ((L, E), (R, L, E)):
        raise PlanError(f"loads: shape {x.shape}, expected (layers, experts) = {(L, E)} or "
                        f"(ranks, layers, experts) = {(R, L, E)}")
    if not np.isfinite(x).all() or (x < 0).any():
        raise PlanError("loads: must be finite and >= 0")
    if x.ndim == 2:
        return Demand(x, np.full(R, 1.0 / R), attention_device, n_devices)
    total = x.sum(0)
    return Demand(total, np.full(R, 1.0 / R), attention_device, n_devices, by_rank=x)


# ---- Step 2: candidates ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Option:
    grouping: Grouping
    slots: float
    caps: np.ndarray    # [L, D]


def _options(topo, shape, expert_mask, att, memory: MemoryBudget, slots, ep_domain) -> list[_Option]:
    L, E = shape.layers, shape.experts
    usable = topo.memory * (1 - memory.reserve_fraction)
    usable[att] -= memory.attention_bytes(shape)
    if (usable[att] < 0).any():
        raise PlanError(f"memory: an attention rank needs {memory.attention_bytes(shape) / 1e9:.1f} GB (weights "
                        f"{shape.dense_bytes / 1e9:.1f} GB + KV for {memory.sequences_per_rank} sequences of "
                        f"{memory.context_tokens} tokens); a device has "
                        f"{topo.memory.min() * (1 - memory.reserve_fraction) / 1e9:.1f} GB usable")
    max_slots = np.floor(usable / shape.expert_bytes).astype(np.int64)          # per device, all layers
    has_src = np.zeros(topo.n_devices, bool)
    has_src[att] = True
    out = []
    for g in groupings(topo):
        if ep_domain is not None and g.label != ep_domain:
            continue
        n_exp = np.bincount(g.group, weights=expert_mask, minlength=g.n_groups)
        if (np.bincount(g.group, weights=has_src, minlength=g.n_groups)[n_exp == 0] > 0).any():
            continue                    # sources with no expert device in their group
        s_need = E / n_exp[n_exp > 0].min()
        s_max = max_slots[expert_mask].min() / L
        cands = [slots] if slots is not None else sorted({s_need, *[s for s in (1, 2, 4, 8) if s > s_need]})
        for s in cands:
            if s > s_max + 1e-9 and slots is None:
                continue
            caps = device_caps(g.group, expert_mask, s, L, E, exact=slots is not None)
            if caps is not None and (caps.sum(0) <= max_slots).all():
                out.append(_Option(g, float(s), caps))
    return out


def _no_option_error(topo, shape, expert_mask, memory, slots, ep_domain) -> PlanError:
    usable = topo.memory[expert_mask] * (1 - memory.reserve_fraction)
    labels = [g.label for g in groupings(topo)]
    if ep_domain is not None and ep_domain not in labels:
        return PlanError(f"ep_domain: {ep_domain!r} is not a domain of {topo.name} (domains: {labels})")
    n_exp = int(expert_mask.sum())
    if slots is not None and slots * n_exp < shape.experts:
        return PlanError(f"slots_per_device: {slots} slots x {n_exp} expert devices < {shape.experts} experts: "
                         f"every expert needs a slot")
    what = f"EP domain {ep_domain!r}" if ep_domain else "any EP domain"
    extra = f" with {slots} slots per device" if slots is not None else ""
    return PlanError(f"memory: no placement of {shape.name} fits {what}{extra}: one copy of the routed experts is "
                     f"{shape.all_experts_bytes / 1e9:.1f} GB and the {int(expert_mask.sum())} expert devices offer "
                     f"{usable.sum() / 1e9:.1f} GB before attention weights and KV "
                     f"(domains: {labels})")


def _sample_layers(L: int, n: int) -> np.ndarray:
    return np.unique(np.linspace(0, L - 1, min(n, L)).round().astype(np.int64))


def _place_all(opt: _Option, demand: Demand, layers: np.ndarray, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    D, E = demand.n_devices, demand.total.shape[1]
    chunk = max(1, int(4e6 // (D * E)))
    parts = [place_replicas(opt.grouping, opt.caps[layers[i:i + chunk]], demand, layers[i:i + chunk], refine)
             for i in range(0, len(layers), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _score(plan_: Plan, layers: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Total modelled time of `layers` (rows: their index in the plan's replica arrays, default = layers)."""
    rows = layers if rows is None else rows
    return sum(routing_cost(plan_.layer_routing(int(layer), int(row)), plan_.topology, plan_.shape,
                            plan_.expert_mask).time for layer, row in zip(layers, rows))


# ---- Step 4: against the previous plan -------------------------------------------------------------------------------
def _comparable(previous: Plan | None, shape: ModelShape, n_devices: int) -> bool:
    """Whether `previous` holds the same layers and experts on the same devices (so replicas can be matched)."""
    return previous is not None and previous.topology.n_devices == n_devices \
        and previous.replica_expert.shape[0] == shape.layers and previous.shape.experts == shape.experts


def migration_bytes(rep_e, rep_d, prev_e, prev_d, shape: ModelShape, n_devices: int) -> float:
    """Bytes of experts a device must load: replicas (layer, device, expert) of the new plan beyond the previous
    plan's copies on that device."""
    E = shape.experts
    L = rep_e.shape[0]
    key = (np.arange(L)[:, None] * n_devices + rep_d) * E + rep_e
    old = (np.arange(L)[:, None] * n_devices + prev_d) * E + prev_e
    k_new, c_new = np.unique(key, return_counts=True)
    k_old, c_old = np.unique(old, return_counts=True)
    have = np.zeros(len(k_new), dtype=np.int64)
    pos = np.searchsorted(k_old, k_new)
    hit = (pos < len(k_old)) & (k_old[np.minimum(pos, len(k_old) - 1)] == k_new)
    have[hit] = c_old[pos[hit]]
    return float(np.maximum(c_new - have, 0).sum() * shape.expert_bytes)


def keep_positions(rep_e, rep_d, prev_e, prev_d, part: np.ndarray, caps: np.ndarray, E: int) -> np.ndarray:
    """New rep_d [L, S] after moving whole device contents between devices of one `part` domain (a node) with the
    same slots, greedily maximising the replicas that stay where `prev` had them."""
    L, D = caps.shape
    first = domain_starts(part)
    size = np.diff(np.r_[first, D])
    B, n = int(size.max()), len(first)
    slot = np.where(np.arange(B)[None] < size[:, None], first[:, None] + np.arange(B)[None], -1)   # [n, B]
    new_dev = rep_d.copy()
    for layer in range(L):
        have_new = np.zeros((D + 1, E), np.float32)
        have_old = np.zeros((D + 1, E), np.float32)
        have_new[rep_d[layer], rep_e[layer]] = 1
        have_old[prev_d[layer], prev_e[layer]] = 1
        overlap = have_new[slot] @ have_old[slot].transpose(0, 2, 1)          # [n, B, B]: new i vs old j
        cap = np.r_[caps[layer], -1][slot]
        overlap[cap[:, :, None] != cap[:, None, :]] = -1                   # only swap equal-slot devices
        overlap[(slot < 0)[:, :, None] | (slot < 0)[:, None, :]] = -np.inf
        dest = np.arange(D)
        for _ in range(B):
            flat = overlap.reshape(n, B * B).argmax(1)
            i, j = flat // B, flat % B
            ok = np.isfinite(overlap[np.arange(n), i, j])
            dest[slot[ok, i[ok]]] = slot[ok, j[ok]]
            overlap[np.arange(n)[ok], i[ok], :] = -np.inf
            overlap[np.arange(n)[ok], :, j[ok]] = -np.inf
        new_dev[layer] = dest[rep_d[layer]]
    return new_dev


def sort_by_device(rep_e: np.ndarray, rep_d: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's replicas [L, S] ordered by device, then expert (the order a `Plan` keeps them in)."""
    order = np.argsort(rep_d * E + rep_e, axis=1, kind="stable")
    return np.take_along_axis(rep_e, order, 1), np.take_along_axis(rep_d, order, 1)


# ---- Step 6: figures ---------------------------------------------------------------------------------------------
def evaluate(p: Plan, previous: Plan | None = None, memory: MemoryBudget | None = None) -> PlanFigures:
    """The plan's predicted figures from the cost model, on the loads it was planned for."""
    topo, shape = p.topology, p.shape
    memory = memory or MemoryBudget()
    L, D, T = shape.layers, topo.n_devices, topo.n_tiers
    costs = [routing_cost(p.layer_routing(layer), topo, shape, p.expert_mask) for layer in range(L)]
    per_pair = shape.hidden * (shape.dispatch_bytes + shape.combine_bytes)
    tier_bytes = np.sum([c.tier_tokens for c in costs], axis=0) * per_pair
    slow = topo.slowest_tier()
    mem = np.bincount(p.replica_device.ravel(), minlength=D) * shape.expert_bytes
    mem[p.attention_device] += memory.attention_bytes(shape)
    if _comparable(previous, shape, D):
        moved = migration_bytes(p.replica_expert, p.replica_device, previous.replica_expert,
                                previous.replica_device, shape, D)
    else:
        moved = float(p.replica_expert.size * shape.expert_bytes)
    mean = lambda f: float(np.mean([f(c) for c in costs]))
    return PlanFigures(
        layer_time=mean(lambda c: c.time), dispatch=mean(lambda c: c.dispatch), expert=mean(lambda c: c.expert),
        combine=mean(lambda c: c.combine), compute=mean(lambda c: c.compute), hbm=mean(lambda c: c.hbm),
        link_time=np.mean([c.link for c in costs], axis=0) if T else np.zeros(0),
        balancedness=mean(lambda c: c.balancedness), device_tokens=np.mean([c.device_tokens for c in costs], 0),
        tier_bytes=tier_bytes, slowest_tier=slow,
        slowest_tier_share=float(tier_bytes[slow + 1] / tier_bytes.sum()) if slow >= 0 and tier_bytes.sum() else 0.0,
        memory=mem, migration_bytes=moved)


# ---- the entry point -----------------------------------------------------------------------------------------------
def plan(topology: Topology, shape: ModelShape, loads, *, attention_ranks: int | None = None, colocate: bool = True,
         slots_per_device: float | None = None, ep_domain: str | None = None, memory: MemoryBudget | None = None,
         previous: Plan | None = None, min_gain: float = 0.02, search_layers: int = 4, tie: float = 0.01) -> Plan:
    """Plan attention ranks, expert replicas, expert groups, routing and Engram shards.

    loads: [L, E] tokens per expert per decode step (split evenly over ranks) or [R, L, E] by source rank.
    attention_ranks: ranks wanted (default: one per device when `colocate`). colocate: attention and experts share
    devices (else attention ranks get devices of their own). slots_per_device: replicas per device per layer (default:
    chosen with the EP domain). ep_domain: force a grouping label (`node`, `network/4`, ...; default: chosen).
    previous: the plan in force; it is kept (re-routed for the new loads) unless the new plan is more than
    `min_gain` faster. search_layers: layers the candidates are scored on; tie: candidates within this share of the
    fastest count as equal (fewer EP groups, then fewer slots, win)."""
    memory = memory or MemoryBudget()
    L, D = shape.layers, topology.n_devices

    # Step 1: sources and their demand.
    att, expert_mask = place_attention(topology, attention_ranks, colocate)
    demand = make_demand(loads, shape, att, D)

    # Step 2: EP domain and slots, scored on a few layers.
    options = _options(topology, shape, expert_mask, att, memory, slots_per_device, ep_domain)
    if not options:
        raise _no_option_error(topology, shape, expert_mask, memory, slots_per_device, ep_domain)
    sample = _sample_layers(L, search_layers)

    def candidate(opt: _Option, layers: np.ndarray, refine: bool = False) -> Plan:
        rep_e, rep_d = _place_all(opt, demand, layers, refine)
        return Plan("moemesh", topology, shape, demand, att, expert_mask, opt.grouping, opt.slots, rep_e, rep_d,
                    "nearest")

    scores = np.array([_score(candidate(o, sample), sample, np.arange(len(sample))) for o in options])
    # Within 1% of the fastest, prefer fewer EP groups (one big pool absorbs per-step fluctuations), then fewer slots.
    near = [i for i in range(len(options)) if scores[i] <= scores.min() * (1 + tie)]
    best = options[min(near, key=lambda i: (options[i].grouping.n_groups, options[i].slots, scores[i]))]

    # Step 3: every layer.
    result = candidate(best, np.arange(L), refine=True)

    # Step 4: against the previous plan.
    if _comparable(previous, shape, D) and np.array_equal(previous.attention_device, att) \
            and np.array_equal(previous.expert_mask, expert_mask):
        kept = replace(previous, demand=demand, figures=None)
        if _score(result, sample) >= (1 - min_gain) * _score(kept, sample):
            result = kept
        elif previous.grouping.label == result.grouping.label:
            rep_d = keep_positions(result.replica_expert, result.replica_device, previous.replica_expert,
                                   previous.replica_device, result.grouping.levels[-2], best.caps, shape.experts)
            rep_e, rep_d = sort_by_device(result.replica_expert, rep_d, shape.experts)
            result = replace(result, replica_expert=rep_e, replica_device=rep_d)

    # Steps 5 and 6.
    result.engram = place_engram(topology, shape, memory)
    result.figures = evaluate(result, previous, memory)
    return result
