"""Placement primitives of the planner: EP-domain candidates, slots per device, and replicas -> devices.

Legend: D = devices, L = layers (Lc: a chunk of them), E = experts, G = EP groups, P = parent domains,
C = child domains. All functions are pure, vectorised over layers and domains (no loop over devices x experts).

`place_replicas` is the algorithm, per EP group and layer:
  Step 1: replica counts. Every expert once, the spare slots to the experts with the most load per replica
          (water-filling, the end state of EPLB's one-at-a-time greedy). Each replica plans to take q_e = w_e / c_e.
  Step 2a: pins, down the tiers (group -> supernode slice / NVLink domain -> node -> device): a domain keeps
           inside it as many replicas of e as its own sources fill completely (floor(demand_e / q_e)), so that
           this traffic never leaves it; a child's pins come out of its parent's.
  Step 2b: packing, up the tiers: the replicas pinned exactly at a domain go to its devices with free slots,
           heaviest first, each to the least loaded device (longest-processing-time packing in rounds); the last
           pass packs the group's unpinned replicas over all its devices, which balances device load.
  Step 2c: swaps: the most loaded device of each group trades a replica with another device when that lowers
           the larger load of the two (pins respected), a few dozen times.
  Step 3: replicas -> (expert, device) lists.
"""

from __future__ import annotations

import numpy as np

from moemesh.cluster.planner.cost import Demand, Grouping, _safe_div
from moemesh.cluster.planner.topology import Topology, domain_starts


# ---- EP-domain candidates ----------------------------------------------------------------------------------------
def groupings(topo: Topology) -> list[Grouping]:
    """Candidate EP domains, smallest first: every tier's domains, and slices of a tier's domain made of whole
    inner-tier domains (1/2, 1/4, ... of it). A partition equal to an earlier one is dropped (the innermost tier
    with that partition names it and carries its traffic)."""
    D, T = topo.n_devices, topo.n_tiers
    devices = np.arange(D)
    out: list[Grouping] = []
    seen: set[bytes] = set()

    def levels_below(t: int, group: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        parts, links, last = [], [], group
        for u in range(t - 1, -1, -1):
            p = topo.domain[u]
            if domain_starts(p).size > domain_starts(last).size:
                parts.append(p)
                links.append(u + 1)
                last = p
        if D > domain_starts(last).size:
            parts.append(devices)
            links.append(0)
        return parts, links

    def add(label: str, group: np.ndarray, t: int):
        sig = group.tobytes()
        if sig in seen:
            return
        seen.add(sig)
        parts, links = levels_below(t, group)
        out.append(Grouping(label, (group, *parts), (t + 1, *links)))

    for t in range(T):
        if t > 0:   # slices of tier t made of whole tier t-1 domains, smallest slices first
            inner, outer = topo.domain[t - 1], topo.domain[t]
            first_inner = domain_starts(inner)
            outer_of_inner = outer[first_inner]
            n_inner = np.bincount(outer_of_inner)
            rank_in_outer = np.arange(len(first_inner)) - np.r_[0, np.cumsum(n_inner)[:-1]][outer_of_inner]
            ks = [k for k in 2 ** np.arange(1, 20) if (n_inner % k == 0).all() and (n_inner // k >= 2).all()]
            for k in sorted(ks, reverse=True):
                slice_of_inner = outer_of_inner * k + rank_in_outer // (n_inner[outer_of_inner] // k)
                add(f"{topo.tier_names[t]}/{k}", slice_of_inner[inner], t)
        add(topo.tier_names[t], topo.domain[t], t)
    return out


# ---- slots -------------------------------------------------------------------------------------------------------
def device_caps(group: np.ndarray, expert_mask: np.ndarray, slots: float, layers: int, experts: int,
                exact: bool) -> np.ndarray | None:
    """[L, D] replica slots of each device in each layer, or None when a group cannot hold every expert once.

    A group of n expert devices gets S = round(slots * n) slots per layer (at least E unless `exact`); each device
    takes S // n, and the S % n spare slots rotate over the devices from layer to layer in a spread-out order, so a
    fractional `slots` averages out over layers."""
    D = len(group)
    caps = np.zeros((layers, D), dtype=np.int64)
    for g in range(int(group[-1]) + 1):
        devs = np.flatnonzero((group == g) & expert_mask)
        n = devs.size
        if n == 0:
            continue
        S = int(round(slots * n))
        if S < experts:
            if exact:
                return None
            S = experts
        base, extra = divmod(S, n)
        caps[:, devs] = base
        if extra:
            spread = devs[np.argsort((np.arange(n) * 0.6180339887498949) % 1.0, kind="stable")]
            pick = (np.arange(layers)[:, None] * extra + np.arange(extra)[None, :]) % n      # [L, extra]
            caps[np.arange(layers)[:, None], spread[pick]] += 1
    return caps


# ---- Step 1: how many replicas -------------------------------------------------------------------------------------
def water_fill(w: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """w [N, E] > 0 loads, slots [N] -> replica counts [N, E] >= 1 with sum `slots`, minimising max_e w_e / c_e.

    c_e = max(1, ceil(w_e / tau)) for the smallest tau whose total fits (bisection), then the few slots left to
    the experts with the most load per replica. Rows with fewer slots than experts get zeros."""
    N, E = w.shape
    out = np.zeros((N, E), dtype=np.int64)
    ok = slots >= E
    if not ok.any():
        return out
    w, slots = w[ok], slots[ok]
    lo, hi = np.zeros(len(w)), w.max(1)
    for _ in range(60):
        mid = (lo + hi) / 2
        fits = np.maximum(1.0, np.ceil(w / mid[:, None])).sum(1) <= slots
        hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid)
    c = np.maximum(1.0, np.ceil(w / hi[:, None])).astype(np.int64)
    left = slots - c.sum(1)
    while (left > 0).any():
        order = np.argsort(-(w / c), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(E)[None, :].repeat(len(w), 0), axis=1)
        add = rank < left[:, None]
        c += add
        left -= add.sum(1)
    out[ok] = c
    return out


# ---- Step 2b: balanced packing -------------------------------------------------------------------------------------
def pack_rounds(item_row: np.ndarray, item_load: np.ndarray, free: np.ndarray, load0: np.ndarray,
                norm: np.ndarray) -> np.ndarray:
    """Longest-processing-time packing (each item, heaviest first, to the least loaded child with a free slot),
    many independent rows at once, a round of items per step.

    Items are sorted by (row, load descending). free [P, C]: free slots of each child of a row; load0 [P, C]: load
    already on it; norm [P, C] > 0: its size (loads are compared per unit of size). A round gives the next items to
    the least loaded children in order, as long as item-at-a-time LPT would do the same: child j (j-th lightest) may
    take item j only if its load is at most that of every earlier child after taking its item. Returns each
    item's child column."""
    P, C = free.shape
    n_items = np.bincount(item_row, minlength=P)
    ptr = np.r_[0, np.cumsum(n_items)[:-1]]
    end = ptr + n_items
    free = free.copy()
    load = load0 / norm
    out = np.empty(len(item_row), dtype=np.int64)
    cols = np.arange(C)
    active = np.flatnonzero(n_items > 0)
    while active.size:
        avail = free[active] > 0
        order = np.argsort(np.where(avail, load[active], np.inf), axis=1, kind="stable")
        n_take = np.minimum(avail.sum(1), end[active] - ptr[active])
        if (n_take == 0).any():
            raise RuntimeError("pack_rounds: items left but no free slot (slot accounting is broken)")
        item = np.minimum(ptr[active][:, None] + cols[None, :], len(item_load) - 1)          # [A, C]
        rows_all = np.broadcast_to(active[:, None], order.shape)
        l_sorted = load[rows_all, order]
        after = l_sorted + item_load[item] / norm[rows_all, order]
        before_min = np.minimum.accumulate(np.c_[np.full(len(active), np.inf), after[:, :-1]], axis=1)
        ok = (l_sorted <= before_min) & (cols[None, :] < n_take[:, None])
        m = np.where(ok.all(1), C, np.argmin(ok, axis=1))                                     # leading run
        r, j = np.nonzero(cols[None, :] < m[:, None])
        rows, child, items = active[r], order[r, j], ptr[active][r] + j
        out[items] = child
        load[rows, child] += item_load[items] / norm[rows, child]
        free[rows, child] -= 1
        ptr[active] += m
        active = active[ptr[active] < end[active]]
    return out


# ---- Step 2a: pins ---------------------------------------------------------------------------------------------------
def local_replicas(c_par: np.ndarray, q_par: np.ndarray, a: np.ndarray, cap: np.ndarray, starts: np.ndarray,
                   sizes: np.ndarray) -> np.ndarray:
    """c_par [Lc, P, H] replicas pinned inside each parent domain (H experts), q_par [Lc, P, H] their planned load,
    a [Lc, C, H] demand of the sources inside each child, cap [Lc, C] slots of each child; parent p's children are
    starts[p] .. starts[p] + sizes[p] - 1. Returns k [Lc, C, H]: replicas pinned inside each child, as many as the
    child's own demand fills completely (floor(a / q)), within the parent's pins and the child's slots."""
    parent = np.repeat(np.arange(len(starts)), sizes)
    qc = q_par[:, parent]
    k = np.minimum(np.floor(_safe_div(a, qc) * (1 + 1e-6)), c_par[:, parent]).astype(np.int64)   # rounding slack
    ksum = np.add.reduceat(k, starts, axis=1)
    if (ksum > c_par).any():
        ratio = np.where(ksum > c_par, c_par / np.maximum(ksum, 1), 1.0)
        k = np.floor(k * ratio[:, parent]).astype(np.int64)
    over = k.sum(-1) > cap
    if over.any():     # more pins than slots: keep the heaviest
        li, ci = np.nonzero(over)
        kk, order = k[li, ci], np.argsort(-qc[li, ci], axis=1, kind="stable")
        ks = np.take_along_axis(kk, order, 1)
        allowed = np.clip(cap[li, ci][:, None] - (np.cumsum(ks, 1) - ks), 0, ks)
        np.put_along_axis(kk, order, allowed, 1)
        k[li, ci] = kk
    return k


# ---- Step 2c: local improvement -------------------------------------------------------------------------------------
def refine_swaps(layer: np.ndarray, dev: np.ndarray, load: np.ndarray, pin: np.ndarray, dom: np.ndarray,
                 grouping: Grouping, Lc: int, fixed: np.ndarray, devices_per_row: np.ndarray,
                 rounds: int = 64, max_moves: int = 4, budget: float = 3e7) -> np.ndarray:
    """Replicas given by layer/dev/load [n] (pinned inside domain dom[i] of level pin[i]; `fixed` ones never
    move). Up to `rounds` times, in every (layer, group) at once: swap one replica of the most loaded device with
    one of another device when that lowers the larger of the two loads, each staying inside its pinned domain
    (candidates: the `max_moves` heaviest movable replicas of the most loaded device, against every other replica;
    fewer rounds when rows x candidates exceed `budget`, so that many small groups stay cheap).
    devices_per_row [Lc * G]: devices with slots in each (layer, group). Returns the new devices."""
    D = len(grouping.group)
    levels = np.stack(grouping.levels)                                  # [n_levels, D]
    row = layer * grouping.n_groups + grouping.group[dev]
    order = np.argsort(row, kind="stable")
    n_rows = Lc * grouping.n_groups
    count = np.bincount(row, minlength=n_rows)
    width = int(count.max())
    start = np.r_[0, np.cumsum(count)[:-1]]
    slot = np.full((n_rows, width), -1)
    rank = np.arange(len(row)) - start[row[order]]
    slot[row[order], rank] = order                                      # [rows, width] item ids, -1 = none
    valid = slot >= 0
    it = np.where(valid, slot, 0)
    dev = dev.copy()
    dev_load = np.bincount(layer * D + dev, weights=load, minlength=Lc * D).reshape(Lc, D)
    q = np.where(valid, load[it], 0.0)
    movable = valid & ~fixed[it]
    row_layer = np.arange(n_rows) // grouping.n_groups
    mean = np.bincount(row, weights=load, minlength=n_rows) / np.maximum(devices_per_row, 1)
    d0 = np.where(valid, dev[it], 0)
    worst = np.where(valid, dev_load[row_layer[:, None], d0], -np.inf).max(1)
    active = np.flatnonzero((count > 0) & (worst > mean * (1 + 1e-3)))     # rows already balanced are left alone
    rounds = int(min(rounds, max(8, budget // max(1, active.size * max_moves * width))))
    pinned_below_group = bool((pin[~fixed] > 0).any())
    for _ in range(rounds):
        if not active.size:
            break
        ra, v, itr, lay = active, valid[active], it[active], row_layer[active]
        d_items = np.where(v, dev[itr], 0)
        l_items = np.where(v, dev_load[lay[:, None], d_items], -np.inf)
        hi = d_items[np.arange(len(ra)), np.argmax(l_items, axis=1)]
        l_hi = dev_load[lay, hi]
        mov = movable[ra]
        on_hi = mov & (d_items == hi[:, None])
        k = min(int(on_hi.sum(1).max()), max_moves)
        if k == 0:
            break
        a_pos = np.argpartition(np.where(on_hi, -q[ra], np.inf), k - 1, axis=1)[:, :k]    # heaviest items on hi
        a_ok = np.take_along_axis(on_hi, a_pos, 1)
        a = np.take_along_axis(itr, a_pos, 1)                                               # [rows, k]
        qr = q[ra]
        delta = np.take_along_axis(qr, a_pos, 1)[:, :, None] - qr[:, None, :]               # [rows, k, width]
        new_max = np.maximum(l_hi[:, None, None] - delta, np.where(v, l_items, np.inf)[:, None, :] + delta)
        ok = a_ok[:, :, None] & (mov & (d_items != hi[:, None]))[:, None, :] & (delta > 0)
        ok &= new_max < l_hi[:, None, None] * (1 - 1e-9)
        if (pin[a] > 0).any():                                                              # a may go to b's device
            ok &= levels[pin[a][:, :, None], d_items[:, None, :]] == dom[a][:, :, None]
        if pinned_below_group:                                                              # b may go to hi
            ok &= (levels[pin[itr], hi[:, None]] == dom[itr])[:, None, :]
        score = np.where(ok, new_max, np.inf).reshape(len(ra), -1)
        best = np.argmin(score, axis=1)
        hit = np.isfinite(score[np.arange(len(ra)), best])
        if not hit.any():
            break
        r = np.flatnonzero(hit)
        ia, ib = a[r, best[r] // width], itr[r, best[r] % width]
        to_b, d_h = dev[ib], hi[r]
        shift = load[ia] - load[ib]
        dev_load[lay[r], d_h] -= shift
        dev_load[lay[r], to_b] += shift
        dev[ia], dev[ib] = to_b, d_h
        # rows stay while they improve and their heaviest device is more than 0.1% above the mean
        active = ra[hit & (l_hi > mean[ra] * (1 + 1e-3))]
    return dev


# ---- the whole placement -------------------------------------------------------------------------------------------
def place_replicas(grouping: Grouping, caps: np.ndarray, demand: Demand, layers,
                   refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Replicas of `layers` for an EP grouping and slots caps [Lc, D] (see the module docstring); `refine=False`
    skips Step 2c (the planner's quick scoring of candidates).
    Returns (expert [Lc, S], device [Lc, S]), each layer's replicas ordered by device then expert."""
    layers = np.asarray(layers)
    Lc, D = caps.shape
    E = demand.total.shape[1]
    group = grouping.group
    G = grouping.n_groups
    group_first = domain_starts(group)

    # Step 1: replica counts per group; a tiny floor keeps cold experts ordered.
    w = demand.by_domain(layers, group, G)
    w = w + 1e-9 * w.mean(-1, keepdims=True) + 1e-12
    slots = np.add.reduceat(caps, group_first, axis=1)                             # [Lc, G]
    c = water_fill(w.reshape(-1, E), slots.ravel()).reshape(Lc, G, E)
    q = w / np.maximum(c, 1)                                                        # [Lc, G, E]

    # Step 2a: pins, top-down. pins[i]: [Lc, n_i, |hot_i|] replicas that must stay inside each level-i domain,
    # for the experts hot_i that can have any (an expert needs many replicas before a small domain fills one).
    hot = [np.arange(E)]
    pins = [c]
    coarse = group
    for fine in grouping.levels[1:]:
        first_fine = domain_starts(fine)
        parent_of_child = coarse[first_fine]
        starts = domain_starts(parent_of_child)
        sizes = np.diff(np.r_[starts, len(first_fine)])
        par_group = group[domain_starts(coarse)]
        h = hot[-1][(pins[-1] > 0).any((0, 1))] if pins[-1].size else hot[-1][:0]
        sub = np.searchsorted(hot[-1], h)
        a = demand.by_domain(layers, fine, len(first_fine), experts=h)
        k = local_replicas(pins[-1][:, :, sub], q[:, par_group][:, :, h], a,
                           np.add.reduceat(caps, first_fine, axis=1), starts, sizes)
        keep = k.any((0, 1))
        hot.append(h[keep])
        pins.append(k[:, :, keep])
        coarse = fine

    # Step 2b: pack, fine to coarse: the replicas pinned exactly at a domain (not at one of its children) go to its
    # devices with free slots, heaviest first to the least loaded.
    free, load = caps.copy(), np.zeros((Lc, D))
    out_l, out_d, out_e, out_q, out_pin, out_dom = [], [], [], [], [], []
    for i in range(len(grouping.levels) - 1, -1, -1):
        part = grouping.levels[i]
        first = domain_starts(part)
        exact = pins[i].copy()
        if i + 1 < len(pins):
            child_first = domain_starts(grouping.levels[i + 1])
            child_pins = np.add.reduceat(pins[i + 1], domain_starts(part[child_first]),
                                         axis=1)
            exact[:, :, np.searchsorted(hot[i], hot[i + 1])] -= child_pins
        l_idx, j, h_idx = np.nonzero(exact)
        cnt = exact[l_idx, j, h_idx]
        l_idx, j, e = np.repeat(l_idx, cnt), np.repeat(j, cnt), np.repeat(hot[i][h_idx], cnt)
        item_load = q[l_idx, group[first[j]], e]
        if i == len(grouping.levels) - 1:          # the device level: a domain is one device
            dev = first[j]
        else:
            row = l_idx * len(first) + j
            order = np.lexsort((e, -item_load, row))
            l_idx, j, e, item_load, row = l_idx[order], j[order], e[order], item_load[order], row[order]
            size = np.diff(np.r_[first, D])
            width = int(size.max())
            valid = np.arange(width)[None, :] < size[:, None]
            col_dev = np.where(valid, first[:, None] + np.arange(width)[None, :], 0)          # [n, width]
            free_r, load_r, caps_r = (np.where(valid[None], x[:, col_dev], 0).reshape(Lc * len(first), width)
                                      for x in (free, load, caps))                            # [Lc * n, width]
            col = pack_rounds(row, item_load, free_r, load_r, np.maximum(caps_r, 1))
            dev = first[j] + col
        np.add.at(free, (l_idx, dev), -1)
        np.add.at(load, (l_idx, dev), item_load)
        out_l.append(l_idx), out_d.append(dev), out_e.append(e)
        out_q.append(item_load), out_pin.append(np.full(len(e), i)), out_dom.append(j)

    # Step 2c: swaps between each group's most loaded device and another, inside every replica's pinned domain.
    l_all, d_all, e_all = np.concatenate(out_l), np.concatenate(out_d), np.concatenate(out_e)
    pin = np.concatenate(out_pin)
    if refine:
        d_all = refine_swaps(l_all, d_all, np.concatenate(out_q), pin, np.concatenate(out_dom), grouping, Lc,
                             fixed=pin == len(grouping.levels) - 1,
                             devices_per_row=np.add.reduceat(caps > 0, group_first, axis=1).ravel())

    # Step 3: (expert, device) lists; every layer has the same number of slots.
    order = np.lexsort((e_all, d_all, l_all))
    S = int(caps[0].sum())
    return e_all[order].reshape(Lc, S), d_all[order].reshape(Lc, S)
