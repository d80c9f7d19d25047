"""A plan's cost on fresh decode steps: tokens sampled from the load distribution, replicas picked by the plan's own
rule, one message per token and destination device. This is how the benchmark scores plans (on their own planning
loads, EPLB-like placements already look near perfect).

Legend: R = ranks, T = tokens per rank per step, N = R * T tokens, k = top-k, E = experts, S = replicas, D = devices.
"""

from __future__ import annotations

import numpy as np

from moemesh.cluster.planner.cost import LayerCost, LayerRouting, cost_from_counts
from moemesh.cluster.planner.plan import Plan


def sample_experts(p: np.ndarray, tokens_per_row: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """p [R, E] (rows sum to 1) -> [R * tokens_per_row, k] distinct experts per token, drawn in proportion to p
    (duplicates redrawn)."""
    R, E = p.shape
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    flat = (cdf + np.arange(R)[:, None]).ravel()                      # row r's cdf shifted by r
    row = np.repeat(np.arange(R), tokens_per_row)[:, None]

    def draw(rows):
        u = rows + rng.random(rows.shape)
        return np.minimum(np.searchsorted(flat, u, side="right") - rows * E, E - 1)

    out = draw(np.broadcast_to(row, (len(row), k)).copy())
    for _ in range(100):
        s = np.sort(out, axis=1)
        dup_rows = np.flatnonzero((np.diff(s, axis=1) == 0).any(1))
        if not dup_rows.size:
            break
        sub = out[dup_rows]                       # keep one occurrence of each expert, redraw the others
        order = np.argsort(sub, axis=1, kind="stable")
        srt = np.take_along_axis(sub, order, 1)
        again = np.zeros(sub.shape, dtype=bool)
        np.put_along_axis(again, order, np.c_[np.zeros((len(sub), 1), bool), np.diff(srt, axis=1) == 0], 1)
        redraw = draw(row[dup_rows].repeat(k, 1))
        out[dup_rows] = np.where(again, redraw, sub)
    return out


def _pick(seg_key: np.ndarray, weight: np.ndarray, key: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each query key, a replica whose segment key matches, chosen in proportion to `weight`.
    Returns replica positions (into the arrays sorted by seg_key) or -1 where the key has no weight."""
    order = np.argsort(seg_key, kind="stable")
    sk, cw = seg_key[order], np.cumsum(weight[order])
    lo, hi = np.searchsorted(sk, key, "left"), np.searchsorted(sk, key, "right")
    base = np.where(lo > 0, cw[np.maximum(lo - 1, 0)], 0.0)
    total = np.where(hi > lo, cw[np.maximum(hi - 1, 0)] - base, 0.0)
    pos = np.searchsorted(cw, base + u * total, side="right")
    pos = np.clip(pos, lo, np.maximum(hi - 1, lo))
    return np.where(total > 0, order[np.minimum(pos, len(order) - 1)], -1)


def route_pairs(plan: Plan, r: LayerRouting, src_dev: np.ndarray, expert: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Replica index [n] for each (source device, expert) pair, by the plan's rule."""
    E = plan.shape.experts
    group = plan.grouping.group
    fallback = _pick(group[r.rep_d] * E + r.rep_e, np.ones(len(r.rep_e)), group[src_dev] * E + expert,
                     rng.random(len(expert)))
    if r.kind == "uniform":
        return fallback
    out = np.full(len(expert), -1)
    todo = np.ones(len(expert), bool)
    for lv in r.levels:
        if lv.part is None:
            key = src_dev * E + expert
            pos = np.searchsorted(lv.key, key)
            hit = (pos < len(lv.key)) & (lv.key[np.minimum(pos, len(lv.key) - 1)] == key)
            phi = np.where(hit, lv.phi[np.minimum(pos, len(lv.key) - 1)], 0.0)
            dom_src, dom_rep = src_dev, r.rep_d
        else:
            phi = lv.phi[lv.part[src_dev], expert]
            dom_src, dom_rep = lv.part[src_dev], lv.part[r.rep_d]
        here = todo & (rng.random(len(expert)) < phi)
        if here.any():
            idx = np.flatnonzero(here)
            pick = _pick(dom_rep * E + r.rep_e, lv.cons, dom_src[idx] * E + expert[idx], rng.random(idx.size))
            out[idx] = pick
            todo[idx[pick >= 0]] = False
    return np.where(out >= 0, out, fallback)


def sample_layer_cost(plan: Plan, layer: int, tokens_per_rank: int, rng: np.random.Generator,
                      routing: LayerRouting | None = None) -> LayerCost:
    """Cost of one fresh decode step of one layer: every rank sends `tokens_per_rank` tokens."""
    topo, shape = plan.topology, plan.shape
    r = routing or plan.layer_routing(layer)
    d = plan.demand
    p = d.by_rank[:, layer] if d.by_rank is not None else d.total[layer][None]
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
    R, T, k = len(d.src_device), tokens_per_rank, shape.top_k
    if p.shape[0] == 1:
        experts = sample_experts(p, R * T, k, rng)
    else:
        experts = sample_experts(p, T, k, rng)
    token = np.repeat(np.arange(R * T), k)
    src = d.src_device[token // T]
    rep = route_pairs(plan, r, src, experts.ravel(), rng)
    dest = r.rep_d[rep]
    D = topo.n_devices
    tokens = np.bincount(dest, minlength=D)
    active = np.bincount(r.rep_d[np.unique(rep)], minlength=D)
    msg = np.unique(token * D + dest)                      # one message per token and destination device
    m_src, m_dst = d.src_device[(msg // D) // T], msg % D
    tier = topo.pair_tier(m_src, m_dst)
    n = (topo.n_tiers + 1) * D
    sent = np.bincount(tier * D + m_src, minlength=n).reshape(-1, D).astype(float)
    recv = np.bincount(tier * D + m_dst, minlength=n).reshape(-1, D).astype(float)
    return cost_from_counts(tokens, active, sent, recv, topo, shape, plan.expert_mask)
