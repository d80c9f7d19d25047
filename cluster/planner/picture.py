"""A picture of a plan (`moemesh plan --png FILE`): devices coloured by predicted load, laid out host by host, with
the experts each device holds where they fit, and the bytes per link tier per step as a bar chart.

Layout (D = devices, W = grid width): each grid row holds whole hosts (W = devices per host x hosts per row, chosen to
keep the grid about twice as wide as tall); thin white lines separate hosts, black outlines (thicker for outer tiers)
separate tier domains (a cabinet, a supernode, an NVLink domain, ...), and red triangles mark attention ranks. Devices
without experts are grey. Matplotlib with the Agg backend (no display needed). Figure size is fixed: `FIGSIZE` inches at
`DPI`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moemesh.cluster.planner.plan import Plan

FIGSIZE = (12.0, 6.0)     # inches
DPI = 100                 # -> 1200 x 600 pixels
MAX_LABELLED = 128        # devices beyond which cells carry no text


def grid_layout(host: np.ndarray) -> tuple[int, int, int]:
    """(rows, width, host size) of the device grid; host: [D] host of each device (equal-size hosts assumed for the
    width; a ragged last row is left blank)."""
    D = len(host)
    size = int(np.bincount(host).max())
    hosts = int(host.max()) + 1
    per_row = 1
    while per_row < hosts and hosts / per_row > size * per_row / 2:           # until rows <= width / 2
        per_row *= 2
    per_row = min(per_row, hosts)
    width = size * per_row
    return int(np.ceil(D / width)), width, size


def _cell_text(plan: Plan, d: int) -> str:
    """Replicas per layer on device d; with few experts, layer 0's expert ids."""
    rep_d = plan.replica_device
    n = (rep_d == d).sum() / rep_d.shape[0]
    ids = sorted(set(plan.replica_expert[0][rep_d[0] == d].tolist()))
    head = f"{n:g}/layer"
    return head if not ids or len(ids) > 4 else head + "\n" + ",".join(f"e{e}" for e in ids)


def render_plan(plan: Plan):
    """The figure (matplotlib `Figure`, Agg canvas): axes[0] the device grid (cell (row, col) centred at data
    coordinates (col, row)), axes[1] its colour bar, axes[2] the bytes per tier."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    topo, f = plan.topology, plan.figures
    if f is None:
        raise ValueError("plan: has no figures (evaluate it first)")
    D = topo.n_devices
    rows, width, size = grid_layout(topo.host)
    load = np.full(rows * width, np.nan)                                        # [rows * W]
    load[:D] = np.where(plan.expert_mask, f.device_tokens, np.nan)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_axes((0.07, 0.12, 0.56, 0.74))
    cbar = fig.add_axes((0.64, 0.12, 0.012, 0.74))
    bars = fig.add_axes((0.77, 0.12, 0.21, 0.74))

    # Step 1: the device grid, coloured by load.
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    lo, hi = np.nanmin(load), np.nanmax(load)
    img = grid.imshow(load.reshape(rows, width), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                      aspect="auto", interpolation="nearest")
    fig.colorbar(img, cax=cbar).set_label("tokens per layer (token-expert pairs)", fontsize=8)
    for c in range(size, width, size):
        grid.axvline(c - 0.5, color="white", lw=0.8)
    for t in range(topo.n_tiers - 1):                                           # tier domain outlines
        for b in np.flatnonzero(np.diff(topo.domain[t])) + 1:                   # first device of a domain
            r, c = divmod(int(b), width)
            xs, ys = ([-0.5, width - 0.5], [r - 0.5, r - 0.5]) if c == 0 else \
                ([-0.5, c - 0.5, c - 0.5, width - 0.5], [r + 0.5, r + 0.5, r - 0.5, r - 0.5])
            grid.plot(xs, ys, color="black", lw=1.0 + t)
    for r in range(1, rows):
        grid.axhline(r - 0.5, color="white", lw=0.5)
    if D <= MAX_LABELLED:
        small = max(4.0, min(9.0, 300.0 / max(width, rows * 2)))
        for d in range(D):
            if plan.expert_mask[d]:
                r, c = divmod(d, width)
                dark = load[d] < lo + 0.5 * (hi - lo)
                grid.text(c, r, _cell_text(plan, d), ha="center", va="center", fontsize=small,
                          color="white" if dark else "black")
    if len(plan.attention_device) <= MAX_LABELLED:
        r, c = np.divmod(plan.attention_device, width)
        grid.plot(c - 0.35, r - 0.3, "^", color="red", markersize=4, linestyle="none")
    grid.set_xticks([])
    if rows <= 40:
        grid.set_yticks(range(rows), [f"host {r * width // size}" for r in range(rows)], fontsize=8)
    else:
        grid.set_yticks([])
    grid.set_title(f"{topo.name}: {D} devices, {size}/host; {plan.grouping.label} x{plan.grouping.n_groups} EP; "
                   "black: tier domains, red ^: attention ranks", fontsize=9)

    # Step 2: bytes per tier.
    names = ["device"] + list(topo.tier_names)
    gb = f.tier_bytes / 1e9
    bars.bar(range(len(gb)), gb, color=["#7fbf7f"] + ["#5f8fd0"] * (len(gb) - 1))
    if f.slowest_tier >= 0:
        bars.patches[f.slowest_tier + 1].set_color("#d05f5f")
    bars.set_xticks(range(len(gb)), names, rotation=30, fontsize=8)
    bars.set_ylabel("GB per decode step (dispatch + combine)", fontsize=8)
    bars.set_title("bytes per link tier (red: slowest)", fontsize=9)
    fig.suptitle(f"{plan.planner} plan of {plan.shape.name}: balancedness {f.balancedness:.3f}, "
                 f"MoE layer {f.layer_time * 1e6:.1f} us, slowest-tier share {f.slowest_tier_share:.3f}", fontsize=11)
    return fig


def write_plan_png(plan: Plan, path: str | Path) -> Path:
    """Render `plan` (see `render_plan`) to a PNG of FIGSIZE x DPI pixels; returns the path."""
    path = Path(path)
    render_plan(plan).savefig(path, format="png", dpi=DPI)
    return path
