"""The planner's cost model: who sends which tokens to which replica (routing), and what a MoE layer then costs.

Legend: D = devices, R = attention ranks (sources), L = layers, E = experts, S = expert replicas (slots) of a layer,
T = topology tiers. Link tier index k: 0 = same device (no link), k = t + 1 = topology tier t.

Routing rules (per source rank and expert; the plan's "replica choice rule"):
- `nearest` (ours): nearest replica first, spill by load. Every replica r of expert e in EP group g has a capacity,
  its share of the planned load, q_e = w_ge / c_ge. Demand is matched bottom-up: a source's own device first, then
  its node, then each wider tier inside the group; at each level a domain's unmatched demand takes what the
  domain's replicas have left, spread over them by spare capacity; the rest spills one tier up. At the group level
  everything left is matched.
- `uniform` (baselines): a token for expert e goes to any of e's replicas in its group with equal probability.

Cost of one MoE layer (decode step): see `cost_from_counts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.topology import Topology, domain_starts


# ---- who wants what ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Demand:
    """Tokens per step wanted from each expert, by source. Either `total[L, E]` split over ranks by `share[R]`
    (a rank-1 demand), or `by_rank[R, L, E]`. `src_device[R]`: device of each rank, strictly increasing."""

    total: np.ndarray                   # [L, E]
    share: np.ndarray                   # [R], sums to 1
    src_device: np.ndarray              # [R]
    n_devices: int
    by_rank: np.ndarray | None = None   # [R, L, E]

    @property
    def rank_of_device(self) -> np.ndarray:
        out = np.full(self.n_devices, -1)
        out[self.src_device] = np.arange(len(self.src_device))
        return out

    def by_domain(self, layers, part: np.ndarray, n: int, experts: np.ndarray | None = None) -> np.ndarray:
        """[len(layers), n, E]: demand of the sources inside each domain of `part` ([D] domain ids), for all
        experts or the subset `experts`."""
        src_dom = part[self.src_device]
        total = self.total[layers] if experts is None else self.total[layers][:, experts]
        if self.by_rank is None:
            dom_share = np.bincount(src_dom, weights=self.share, minlength=n)
            return dom_share[None, :, None] * total[:, None, :]
        starts = domain_starts(src_dom)
        rows = self.by_rank[:, layers] if experts is None else self.by_rank[:, layers][:, :, experts]
        out = np.zeros((len(layers), n, total.shape[1]))
        out[:, src_dom[starts]] = np.add.reduceat(rows, starts, axis=0).transpose(1, 0, 2)
        return out

    def at(self, layer: int, rank: np.ndarray, expert: np.ndarray) -> np.ndarray:
        """Demand of `rank[i]` for `expert[i]`."""
        if self.by_rank is None:
            return self.share[rank] * self.total[layer, expert]
        return self.by_rank[rank, layer, expert]

    def dot(self, layer: int, psi: np.ndarray, part: np.ndarray) -> np.ndarray:
        """[R]: sum_e demand[r, e] * psi[part[src_device[r]], e]."""
        dom = part[self.src_device]
        if self.by_rank is None:
            return self.share * (psi @ self.total[layer])[dom]
        return np.einsum("re,re->r", self.by_rank[:, layer], psi[dom])


# ---- the EP domains ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Grouping:
    """An EP-domain choice. `levels` are partitions of the devices ([D] ids, contiguous), coarse to fine:
    levels[0] = the EP groups, levels[-1] = the devices themselves. Traffic matched at level i crosses link tier
    `links[i]` (0 for the device level). Sources only use replicas of their own group."""

    label: str
    levels: tuple[np.ndarray, ...]
    links: tuple[int, ...]

    @property
    def group(self) -> np.ndarray:
        return self.levels[0]

    @property
    def n_groups(self) -> int:
        return int(self.group[-1]) + 1


def _n(part: np.ndarray) -> int:
    return int(part[-1]) + 1


def _coarsen(x: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Sum rows of x ([n_fine, ...], one per `fine` domain) into `coarse` domains (nested, contiguous)."""
    coarse_of_fine = coarse[domain_starts(fine)]
    return np.add.reduceat(x, domain_starts(coarse_of_fine), axis=0)


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


# ---- routing ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LevelRoute:
    """What one level of the matching did. `cons[S]`: tokens each replica takes at this level. `phi`: share of a
    domain's still-unmatched demand this level serves ([n_domains, E]; at the device level, per `key`)."""

    link: int
    part: np.ndarray | None       # [D] domain ids; None at the device level
    cons: np.ndarray              # [S]
    phi: np.ndarray
    key: np.ndarray | None = None  # device level: sorted (device * E + expert) keys that `phi` is given for


@dataclass(eq=False)
class LayerRouting:
    """One layer's replica choice rule, and the expected traffic it gives on the demand it was built from."""

    kind: str                     # "nearest" | "uniform"
    rep_e: np.ndarray             # [S] expert of each replica
    rep_d: np.ndarray             # [S] device of each replica
    rep_load: np.ndarray          # [S] expected tokens per step
    levels: list[LevelRoute]      # fine to coarse
    sent: np.ndarray              # [T + 1, D] token-expert pairs each device sends, by link tier
    recv: np.ndarray              # [T + 1, D] token-expert pairs each device receives, by link tier


def route_nearest(rep_e, rep_d, grouping: Grouping, demand: Demand, layer: int, n_tiers: int) -> LayerRouting:
    """Nearest replica first, spill by load (see the module docstring); capacities come from this demand."""
    E, D = demand.total.shape[1], demand.n_devices
    G = grouping.n_groups
    w_g = demand.by_domain([layer], grouping.group, G)[0]
    g_rep = grouping.group[rep_d]
    c_g = np.bincount(g_rep * E + rep_e, minlength=G * E).reshape(G, E)
    q = _safe_div(w_g, c_g)[g_rep, rep_e]                                # [S] capacity of each replica
    rem_cap = q.copy()
    sent = np.zeros((n_tiers + 1, D))
    recv = np.zeros((n_tiers + 1, D))

    # Step 1: the source's own device.
    key, inv = np.unique(rep_d * E + rep_e, return_inverse=True)
    kdev, ke = key // E, key % E
    krank = demand.rank_of_device[kdev]
    dem0 = np.where(krank >= 0, demand.at(layer, np.maximum(krank, 0), ke), 0.0)
    cap0 = np.bincount(inv, weights=rem_cap)
    served0 = np.minimum(dem0, cap0)
    cons = served0[inv] * _safe_div(rem_cap, cap0[inv])
    rem_cap -= cons
    total = cons.copy()
    levels = [LevelRoute(0, None, cons, _safe_div(served0, dem0), key)]
    np.add.at(sent[0], kdev, served0)
    recv[0] += np.bincount(rep_d, weights=cons, minlength=D)

    # Step 2: each wider domain inside the group, fine to coarse; the group level takes whatever is left.
    parts = grouping.levels[-2::-1]
    links = grouping.links[-2::-1]
    base = parts[0]
    n_base = _n(base)
    rem_dem = demand.by_domain([layer], base, n_base)[0]
    rem_dem -= np.bincount(base[kdev] * E + ke, weights=served0, minlength=n_base * E).reshape(n_base, E)
    np.maximum(rem_dem, 0.0, out=rem_dem)
    keep = np.ones((n_base, E))                     # share of a base domain's demand still unmatched
    for i, (part, link) in enumerate(zip(parts, links)):
        n = _n(part)
        if i:
            rem_dem = _coarsen(rem_dem, parts[i - 1], part)
        k = part[rep_d] * E + rep_e
        cap = np.bincount(k, weights=rem_cap, minlength=n * E).reshape(n, E)
        last = i == len(parts) - 1
        served = rem_dem if last else np.minimum(rem_dem, cap)
        phi = _safe_div(served, rem_dem)
        spread = _safe_div(rem_cap, cap.ravel()[k])
        if last:    # rounding: demand left where no capacity is left goes by the replicas' planned shares
            qsum = np.bincount(k, weights=q, minlength=n * E)
            spread = np.where(cap.ravel()[k] > 1e-9 * (qsum[k] + 1e-30), spread, _safe_div(q, qsum[k]))
        cons = served.ravel()[k] * spread
        rem_cap -= cons
        total += cons
        rem_dem = rem_dem - served
        levels.append(LevelRoute(link, part, cons, phi))
        recv[link] += np.bincount(rep_d, weights=cons, minlength=D)
        # Sources: what each rank sends at this level = its demand left after its device, times the share
        # matched here (phi is constant over a base domain, so it is read at the base domain's ancestor).
        anc = part[domain_starts(base)]                               # [n_base] ancestor at this level
        psi = keep * phi[anc]
        keep = keep * (1.0 - phi[anc])
        out = demand.dot(layer, psi, base)
        has = krank >= 0
        out -= np.bincount(krank[has], weights=served0[has] * psi[base[kdev[has]], ke[has]],
                           minlength=len(out))
        np.add.at(sent[link], demand.src_device, np.maximum(out, 0.0))
    return LayerRouting("nearest", rep_e, rep_d, total, levels, sent, recv)


def route_uniform(rep_e, rep_d, grouping: Grouping, demand: Demand, layer: int, n_tiers: int) -> LayerRouting:
    """Each token for expert e picks one of e's replicas in its group uniformly (the baselines' rule)."""
    E, D = demand.total.shape[1], demand.n_devices
    G = grouping.n_groups
    g_rep = grouping.group[rep_d]
    c_g = np.bincount(g_rep * E + rep_e, minlength=G * E).reshape(G, E)
    inv_c = _safe_div(1.0, c_g.astype(float))                             # [G, E]
    sent = np.zeros((n_tiers + 1, D))
    recv = np.zeros((n_tiers + 1, D))
    levels = []

    # Device level: a replica takes 1/c of its own device's source demand.
    rank = demand.rank_of_device[rep_d]
    own = np.where(rank >= 0, demand.at(layer, np.maximum(rank, 0), rep_e), 0.0) * inv_c[g_rep, rep_e]
    levels.append(LevelRoute(0, None, own, np.zeros(0)))
    recv[0] += np.bincount(rep_d, weights=own, minlength=D)
    np.add.at(sent[0], rep_d[rank >= 0], own[rank >= 0])
    prev_recv, prev_sent = own, np.bincount(rank[rank >= 0], weights=own[rank >= 0], minlength=len(demand.share))

    # Wider levels: cumulative share of the demand inside the replica's (or source's) domain, minus the level below.
    for part, link in zip(grouping.levels[-2::-1], grouping.links[-2::-1]):
        n = _n(part)
        A = demand.by_domain([layer], part, n)[0]                          # [n, E]
        cum_recv = A[part[rep_d], rep_e] * inv_c[g_rep, rep_e]
        K = np.bincount(part[rep_d] * E + rep_e, minlength=n * E).reshape(n, E)
        dom_group = grouping.group[domain_starts(part)]
        cum_sent = demand.dot(layer, K * inv_c[dom_group], part)
        cons = cum_recv - prev_recv
        levels.append(LevelRoute(link, part, cons, np.zeros(0)))
        recv[link] += np.bincount(rep_d, weights=cons, minlength=D)
        np.add.at(sent[link], demand.src_device, cum_sent - prev_sent)
        prev_recv, prev_sent = cum_recv, cum_sent
    return LayerRouting("uniform", rep_e, rep_d, prev_recv, levels, sent, recv)


# ---- cost --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCost:
    """Modelled cost of one MoE layer in one decode step (seconds; tokens are token-expert pairs)."""

    time: float                   # dispatch + expert + combine
    dispatch: float
    expert: float                 # max over devices of max(compute, hbm)
    combine: float
    compute: float                # max over devices
    hbm: float                    # max over devices
    link: np.ndarray              # [T] max over devices of the tier's dispatch + combine time
    balancedness: float           # mean / max tokens over expert devices
    tier_tokens: np.ndarray       # [T + 1] token-expert pairs (or messages) per link tier
    device_tokens: np.ndarray     # [D]


def cost_from_counts(tokens, active, sent, recv, topo: Topology, shape: ModelShape, expert_mask) -> LayerCost:
    """The cost model. Per expert device d (tokens n_d, replicas with work a_d):

        compute_d = n_d * 6 * hidden * width / flops_d
        hbm_d     = (a_d * expert_bytes + n_d * (2 * hidden + 3 * width) * 2) / hbm_bandwidth_d
        expert    = max_d max(compute_d, hbm_d)

    Links, per device d, fabric f and direction: out_kd / in_kd = pairs sent / received over tier k times
    hidden * dispatch_bytes (dispatch) or hidden * combine_bytes (combine);

        phase = max_d max_f max(sum_{k in f} out_kd / bw_k, sum_{k in f} in_kd / bw_k) + max_{k carrying} latency_k

    and layer time = dispatch + expert + combine (no overlap assumed; ping-pong hides part of it in practice)."""
    T = topo.n_tiers
    tokens = np.asarray(tokens, dtype=float)
    compute = tokens * shape.expert_flops_per_token / topo.flops
    act_bytes = tokens * (2 * shape.hidden + 3 * shape.expert_width) * 2.0
    hbm = (np.asarray(active) * shape.expert_bytes + act_bytes) / topo.hbm_bandwidth
    expert = float(np.max(np.maximum(compute, hbm)))
    bw = topo.tier_bandwidth[:, None]
    t_out, t_in = sent[1:] / bw, recv[1:] / bw                            # [T, D] seconds per byte-per-element
    fabrics = sorted(set(topo.tier_fabric))
    per_fabric = [np.maximum(t_out[[i for i in range(T) if topo.tier_fabric[i] == f]].sum(0),
                             t_in[[i for i in range(T) if topo.tier_fabric[i] == f]].sum(0)) for f in fabrics]
    worst = float(np.max(np.max(per_fabric, axis=0))) if T else 0.0
    carrying = sent[1:].sum(1) > 0
    latency = float(topo.tier_latency[carrying].max()) if carrying.any() else 0.0
    dispatch = worst * shape.hidden * shape.dispatch_bytes + latency
    combine = worst * shape.hidden * shape.combine_bytes + latency
    link = np.max(np.maximum(t_out, t_in), axis=1) * shape.hidden * (shape.dispatch_bytes + shape.combine_bytes)
    ex = tokens[expert_mask]
    bal = float(ex.mean() / ex.max()) if ex.size and ex.max() > 0 else 1.0
    return LayerCost(time=dispatch + expert + combine, dispatch=dispatch, expert=expert, combine=combine,
                     compute=float(compute.max()), hbm=float(hbm.max()), link=link, balancedness=bal,
                     tier_tokens=sent.sum(1), device_tokens=tokens)


def routing_cost(r: LayerRouting, topo: Topology, shape: ModelShape, expert_mask) -> LayerCost:
    """Expected cost of a routed layer: a replica with expected load x has work with probability 1 - exp(-x)."""
    D = topo.n_devices
    tokens = np.bincount(r.rep_d, weights=r.rep_load, minlength=D)
    active = np.bincount(r.rep_d, weights=-np.expm1(-r.rep_load), minlength=D)
    return cost_from_counts(tokens, active, r.sent, r.recv, topo, shape, expert_mask)
