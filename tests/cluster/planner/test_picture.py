"""`moemesh plan --png`: the picture of a plan (size, colours follow load, bytes per tier), and the co-activated
cluster loads the CLI can plan for (`--clusters`)."""

import argparse

import numpy as np
import pytest

from moemesh.cluster.planner import report as plan_cli
from moemesh.cluster.planner.loads import clustered_loads
from moemesh.cluster.planner.picture import DPI, FIGSIZE, grid_layout, render_plan, write_plan_png
from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.plan import MemoryBudget, plan
from moemesh.cluster.planner.topology import validate_spec

NO_KV = MemoryBudget(sequences_per_rank=0, reserve_fraction=0.0)


def small_plan():
    """4 devices on 2 hosts, 4 experts with loads 8, 4, 2, 1, one slot each: four different device loads."""
    topo = validate_spec({
        "name": "png", "devices": 4, "device": {"kind": "X", "memory": "100 GB", "flops": 1e15, "hbm_bandwidth": 1e12},
        "host": {"devices": 2, "dram": "1 TB"},
        "tiers": [{"name": "node", "devices": 2, "fabric": "nvlink", "bandwidth": 100e9, "latency": 1e-6},
                  {"name": "network", "fabric": "ib", "bandwidth": 10e9, "latency": 5e-6}]}).expand()
    shape = ModelShape(name="t", layers=1, experts=4, top_k=1, hidden=1000, expert_width=1000, expert_bytes=1e6,
                       dense_bytes=0, kv_bytes_per_token=0)
    return plan(topo, shape, np.array([[8.0, 4.0, 2.0, 1.0]]), slots_per_device=1, ep_domain="network",
                memory=NO_KV)


def test_png_is_valid_with_the_fixed_size_and_colours_that_follow_load(tmp_path):
    import matplotlib.image as mpimg

    p = small_plan()
    path = write_plan_png(p, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)                                                 # [H, W, 4] floats
    assert img.shape == (int(FIGSIZE[1] * DPI), int(FIGSIZE[0] * DPI), 4)

    fig = render_plan(p)                        # same layout: sample each device cell off-centre (text is centred)
    fig.canvas.draw()
    grid = fig.axes[0]
    _, width, _ = grid_layout(p.topology.host)
    colour = {}
    for d in range(4):
        r, c = divmod(d, width)
        x, y = grid.transData.transform((c + 0.3, r + 0.3))
        colour[d] = tuple(np.round(img[img.shape[0] - int(y), int(x), :3], 3))
    tokens = p.figures.device_tokens
    assert len(set(tokens.tolist())) == 4 and len(set(colour.values())) == 4   # four loads, four colours
    hot, cold = int(tokens.argmax()), int(tokens.argmin())
    assert sum(colour[hot]) > sum(colour[cold])                              # viridis: yellow (hot) vs purple


def test_bars_show_the_bytes_of_every_tier():
    p = small_plan()
    bars = render_plan(p).axes[2]
    heights = [b.get_height() for b in bars.patches]
    assert heights == pytest.approx((p.figures.tier_bytes / 1e9).tolist())
    assert [t.get_text() for t in bars.get_xticklabels()] == ["device", "node", "network"]


def test_grid_layout_keeps_hosts_whole_and_the_grid_wide():
    assert grid_layout(np.arange(8192) // 8) == (64, 128, 8)
    assert grid_layout(np.arange(288) // 4) == (9, 32, 4)
    assert grid_layout(np.arange(3)) == (1, 3, 1)


def test_clustered_loads_by_hand():
    """2 clusters of 4 experts, no popularity skew, affinity 3, no background: a rank gives its own cluster
    4/5 of its tokens (1/5 per expert), the other 1/5 (1/20 per expert)."""
    loads, cluster = clustered_loads(2, 3, 8, 2, 200.0, exponent=0.0, affinity=3.0, background=0.0, seed=1)
    assert loads.shape == (2, 3, 8) and cluster.shape == (3, 8)
    assert np.bincount(cluster[0]).tolist() == [4, 4]
    assert loads.sum((0, 2)) == pytest.approx([200.0] * 3)
    for r in range(2):
        for layer in range(3):
            own = (r + layer) % 2
            want = np.where(cluster[layer] == own, 100 / 5, 100 / 20)
            assert loads[r, layer] == pytest.approx(want)


def test_clustered_loads_background_and_errors():
    loads, _ = clustered_loads(4, 2, 16, 4, 64.0, background=1.0)
    assert loads == pytest.approx(np.full((4, 2, 16), 1.0))
    with pytest.raises(ValueError, match="clusters: must be in 1..16"):
        clustered_loads(4, 2, 16, 17, 64.0)


def test_cli_plans_clustered_loads_and_writes_the_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    plan_cli.add_args(parser)
    png = tmp_path / "p.png"
    args = parser.parse_args(["--topology", "hgx-h100", "--devices", "16", "--model", "v4-flash", "--clusters", "8",
                              "--png", str(png)])
    assert plan_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "8 co-activated clusters" in out and f"picture: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
