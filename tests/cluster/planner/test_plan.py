"""The planner: hand-worked cases, invariants on random inputs, memory errors, comparisons with EPLB, re-planning,
Engram placement, load files, the CLI. Planning time is a benchmark (cluster/bench/plan.py), not a test."""

import argparse
import heapq
import math

import numpy as np
import pytest

from moemesh.cluster.planner import report as plan_cli
from moemesh.cluster.planner.baselines import eplb_global, eplb_hierarchical, replicate_experts, round_robin
from moemesh.cluster.planner.loads import read_loads, scale_loads, write_loads, zipf_loads
from moemesh.cluster.planner.place import pack_rounds, water_fill
from moemesh.cluster.planner.sample import sample_layer_cost
from moemesh.cluster.planner.shape import PRESETS, ModelShape, resolve_model
from moemesh.cluster.planner.plan import MemoryBudget, PlanError, migration_bytes, plan
from moemesh.cluster.planner.topology import load_topology, validate_spec

NO_KV = MemoryBudget(sequences_per_rank=0, reserve_fraction=0.0)


def tiny_topology(devices=4, per_node=2, memory="100 GB"):
    return validate_spec({
        "name": "tiny", "devices": devices,
        "device": {"kind": "X", "memory": memory, "flops": 1e15, "hbm_bandwidth": 1e12},
        "host": {"devices": per_node, "dram": "1 TB"},
        "tiers": [{"name": "node", "devices": per_node, "fabric": "nvlink", "bandwidth": 100e9, "latency": 1e-6},
                  {"name": "network", "fabric": "ib", "bandwidth": 10e9, "latency": 5e-6}]}).expand()


def tiny_shape(layers=1, experts=4, top_k=1, **kw):
    return ModelShape(name="tiny", layers=layers, experts=experts, top_k=top_k, hidden=1000, expert_width=1000,
                      expert_bytes=1e6, dense_bytes=0, kv_bytes_per_token=0, **kw)


# ---- known answers, worked by hand -----------------------------------------------------------------------------------
def test_water_fill_matches_the_greedy_by_hand():
    # one replica each, then to the most load per replica: [6,3,1] -> [2,1,1] (3,3,1) -> tie, first: [3,1,1]
    assert water_fill(np.array([[6.0, 3.0, 1.0]]), np.array([5])).tolist() == [[3, 1, 1]]
    phy2log, count = replicate_experts(np.array([[6.0, 3.0, 1.0]]), 5)
    assert count.tolist() == [[3, 1, 1]] and sorted(phy2log[0].tolist()) == [0, 0, 0, 1, 2]


def test_pack_rounds_is_item_at_a_time_lpt():
    rng = np.random.default_rng(3)
    for _ in range(20):
        C, per = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        items = np.sort(rng.random(C * per))[::-1]
        load0 = rng.random((1, C)) * rng.integers(0, 2)
        got = pack_rounds(np.zeros(len(items), int), items, np.full((1, C), per), load0, np.ones((1, C)))
        heap, room, want = [(load0[0, c], c) for c in range(C)], [per] * C, []
        heapq.heapify(heap)
        for x in items:                         # reference: sequential LPT with capacities
            load, c = heapq.heappop(heap)
            want.append(c)
            room[c] -= 1
            if room[c]:
                heapq.heappush(heap, (load + x, c))
        assert got.tolist() == want


def test_small_case_by_hand():
    """4 devices in 2 nodes, 4 experts with loads 4, 2, 1, 1 (8 tokens, 2 per rank), 1 slot each: every expert once,
    device loads {4, 2, 1, 1}. Each expert's demand comes 1/4 from its own device, 1/4 from the other device of its
    node, 1/2 from the other node."""
    topo, shape = tiny_topology(), tiny_shape()
    p = plan(topo, shape, np.array([[4.0, 2.0, 1.0, 1.0]]), slots_per_device=1, ep_domain="network", memory=NO_KV)
    f = p.figures
    assert sorted(p.replica_expert[0].tolist()) == [0, 1, 2, 3]
    assert sorted(f.device_tokens.tolist()) == [1, 1, 2, 4]
    assert f.balancedness == pytest.approx(2 / 4)
    per_pair = 1000 * (1 + 2)                               # hidden x (FP8 dispatch + BF16 combine)
    assert (f.tier_bytes / per_pair).tolist() == pytest.approx([2, 2, 4])
    assert f.slowest_tier == 1 and f.slowest_tier_share == pytest.approx(0.5)
    # cost: HBM-bound experts (the load-4 device reads its expert once plus activations) and an InfiniBand-bound
    # exchange: the load-4 expert receives 4/2 = 2 tokens over the network, 1000 bytes each way per element.
    hbm = ((1 - math.exp(-4)) * 1e6 + 4 * (2 * 1000 + 3 * 1000) * 2) / 1e12
    dispatch = 2 * 1000 * 1 / 10e9 + 5e-6
    combine = 2 * 1000 * 2 / 10e9 + 5e-6
    assert f.expert == pytest.approx(hbm) and f.layer_time == pytest.approx(dispatch + hbm + combine)


def test_hot_experts_are_replicated_on_every_device_and_served_locally():
    """2 experts x 8 tokens on 4 devices with 2 slots: each expert gets 4 replicas of load 2; every device's own
    demand (2 per expert) fills one replica, so each device holds both experts and no token leaves its device."""
    topo, shape = tiny_topology(), tiny_shape(experts=2)
    loads = np.array([[8.0, 8.0]])
    p = plan(topo, shape, loads, slots_per_device=2, ep_domain="network", memory=NO_KV)
    for d in range(4):
        assert sorted(p.replica_expert[0][p.replica_device[0] == d].tolist()) == [0, 1]
    assert p.figures.tier_bytes.tolist() == pytest.approx([16 * 3000, 0, 0])
    assert p.source_routing(0, 2)[p.replica_device[0] == 2].tolist() == [1.0, 1.0]
    e = eplb_global(topo, shape, loads, slots_per_device=2, memory=NO_KV)
    assert e.figures.tier_bytes[2] > 0 and e.figures.slowest_tier_share > 0


# ---- invariants on random inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_invariants_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    preset, devices = [("hgx-h100", 32), ("gb200-nvl72", 144), ("cloudmatrix384", 768), ("hgx-h100", 16)][seed]
    topo = load_topology(preset, devices)
    shape = PRESETS["v4-flash"].model_copy(update={"layers": 5})
    colocate = seed % 2 == 0
    ranks = None if colocate else devices // 4
    R = ranks or devices
    z = float(rng.uniform(0.0, 1.5))
    loads = zipf_loads(5, 256, z, R * 64 * 6, seed)
    if seed == 3:                                   # per-rank loads
        loads = rng.random((R, 5, 256)) ** 4 * 10
    memory = MemoryBudget()
    p = plan(topo, shape, loads, attention_ranks=ranks, colocate=colocate, memory=memory)
    usable = topo.memory * (1 - memory.reserve_fraction)
    assert (p.figures.memory <= usable + 1).all()
    for layer in range(shape.layers):
        rep_e, rep_d = p.replica_expert[layer], p.replica_device[layer]
        assert p.expert_mask[rep_d].all()
        for g in p.expert_groups:                  # every expert at least once per EP domain
            assert set(rep_e[np.isin(rep_d, g)].tolist()) == set(range(256))
        counts = np.bincount(rep_d, minlength=devices)
        assert counts.sum() == rep_e.size and (counts[~p.expert_mask] == 0).all()
        assert counts[p.expert_mask].max() - counts[p.expert_mask].min() <= 1      # slots spread evenly
        route = p.layer_routing(layer)
        total = p.demand.total[layer].sum()
        assert route.sent.sum() == pytest.approx(total) and route.recv.sum() == pytest.approx(total)
        prob = p.source_routing(layer, int(rng.integers(R)))
        assert np.bincount(rep_e, weights=prob, minlength=256) == pytest.approx(np.ones(256))


def test_replicas_go_to_hot_experts():
    topo, shape = load_topology("hgx-h100", 32), PRESETS["v4-flash"].model_copy(update={"layers": 3})
    loads = zipf_loads(3, 256, 1.0, 32 * 64 * 6, 0)
    p = plan(topo, shape, loads, slots_per_device=16, ep_domain="network")
    for layer in range(3):
        c = np.bincount(p.replica_expert[layer], minlength=256)
        order = np.argsort(-loads[layer])
        assert (np.diff(c[order]) <= 0).all()       # more load, never fewer replicas
        assert c[order[0]] > 4 * c[order[-1]] and c[order[-1]] == 1


# ---- memory ----------------------------------------------------------------------------------------------------------
def test_memory_errors_are_clear():
    with pytest.raises(PlanError, match=r"memory: no placement of V4-Pro fits.*822\.1 GB"):
        plan(load_topology("hgx-h100", 8), PRESETS["v4-pro"], zipf_loads(61, 384, 0.6, 8 * 384, 0))
    with pytest.raises(PlanError, match=r"memory: an attention rank needs .* GB"):
        plan(load_topology("hgx-h100", 8), PRESETS["v4-flash"], zipf_loads(43, 256, 0.6, 8 * 384, 0),
             memory=MemoryBudget(context_tokens=10_000_000))
    with pytest.raises(PlanError, match=r"slots_per_device: 1 slots x 16 expert devices < 256 experts"):
        plan(load_topology("hgx-h100", 16), PRESETS["v4-flash"], zipf_loads(43, 256, 0.6, 16 * 384, 0),
             slots_per_device=1)
    with pytest.raises(PlanError, match=r"loads: shape \(2, 256\)"):
        plan(load_topology("hgx-h100", 16), PRESETS["v4-flash"], np.ones((2, 256)))


def test_budget_shapes_the_choice():
    """Little room left by the KV cache forces one EP group over the cluster with the fewest slots; with room, the
    planner keeps traffic off InfiniBand with more copies."""
    topo, shape = load_topology("hgx-h100", 32), PRESETS["v4-flash"]
    loads = zipf_loads(43, 256, 0.6, 32 * 64 * 6, 0)
    roomy = plan(topo, shape, loads)
    tight = plan(topo, shape, loads, memory=MemoryBudget(context_tokens=134_000))   # ~6 GB left for experts
    assert tight.grouping.label == "network" and tight.slots_per_device == 8
    assert tight.figures.memory.max() <= 80e9 * 0.9
    assert roomy.figures.slowest_tier_share < tight.figures.slowest_tier_share


# ---- against the baselines -------------------------------------------------------------------------------------------
def test_beats_eplb_on_balance_and_slow_bytes():
    """Fixed seeded skewed load (Zipf 1.0, seed 0), same EP domain and slots as EPLB global."""
    topo, shape = load_topology("hgx-h100", 64), PRESETS["v4-flash"].model_copy(update={"layers": 8})
    loads = zipf_loads(8, 256, 1.0, 64 * 64 * 6, 0)
    ours = plan(topo, shape, loads, slots_per_device=8, ep_domain="network")
    eplb = eplb_global(topo, shape, loads, slots_per_device=8)
    slow = topo.slowest_tier() + 1
    assert ours.figures.balancedness >= eplb.figures.balancedness
    assert ours.figures.tier_bytes[slow] <= 0.7 * eplb.figures.tier_bytes[slow]
    assert ours.figures.layer_time < eplb.figures.layer_time
    hier = eplb_hierarchical(topo, shape, loads, slots_per_device=8)
    rr = round_robin(topo, shape, loads, slots_per_device=8)
    assert ours.figures.layer_time < min(hier.figures.layer_time, rr.figures.layer_time)


def test_nvlink_domains_win_on_nvl72():
    topo, shape = load_topology("gb200-nvl72", 144), PRESETS["v4-flash"].model_copy(update={"layers": 4})
    loads = zipf_loads(4, 256, 0.6, 144 * 64 * 6, 0)
    ours = plan(topo, shape, loads)
    eplb = eplb_global(topo, shape, loads, slots_per_device=math.ceil(ours.slots_per_device))
    assert ours.grouping.label == "domain" and ours.figures.slowest_tier_share == 0
    rng = np.random.default_rng(0)
    t_ours = np.mean([sample_layer_cost(ours, 1, 64, np.random.default_rng(s)).time for s in range(2)])
    t_eplb = np.mean([sample_layer_cost(eplb, 1, 64, np.random.default_rng(s)).time for s in range(2)])
    assert t_ours <= 0.6 * t_eplb
    c = sample_layer_cost(ours, 0, 64, rng)
    assert c.device_tokens.sum() == 144 * 64 * 6 and c.tier_tokens.sum() <= 144 * 64 * 6


# ---- re-planning -----------------------------------------------------------------------------------------------------
def test_replanning_with_the_same_loads_moves_nothing():
    topo, shape = load_topology("hgx-h100", 32), PRESETS["v4-flash"].model_copy(update={"layers": 4})
    loads = zipf_loads(4, 256, 0.8, 32 * 64 * 6, 0)
    first = plan(topo, shape, loads)
    assert first.figures.migration_bytes == first.replica_expert.size * shape.expert_bytes
    again = plan(topo, shape, loads, previous=first)
    assert again.figures.migration_bytes == 0
    new_loads = zipf_loads(4, 256, 0.8, 32 * 64 * 6, 1)
    moved = plan(topo, shape, new_loads, previous=first, min_gain=0.0)
    assert 0 < moved.figures.migration_bytes < first.figures.migration_bytes
    # the same replicas as a plan made from scratch, but whole devices swapped within nodes to keep what they hold
    fresh = plan(topo, shape, new_loads)
    assert moved.grouping.label == fresh.grouping.label == first.grouping.label
    assert (np.sort(moved.replica_expert, 1) == np.sort(fresh.replica_expert, 1)).all()
    assert moved.figures.migration_bytes < migration_bytes(fresh.replica_expert, fresh.replica_device,
                                                           first.replica_expert, first.replica_device, shape, 32)


# ---- Engram ----------------------------------------------------------------------------------------------------------
def test_engram_shards_follow_dram():
    topo, shape = load_topology("hgx-h200", 32), PRESETS["v4-pro+engram"]
    loads = zipf_loads(61, 384, 0.6, 32 * 64 * 6, 0)
    local = plan(topo, shape, loads, slots_per_device=12)           # 196 GB fits 1 TB of a host's DRAM
    assert local.engram.level == "host" and local.engram.host.shape == (4, 1, 1)
    tight = MemoryBudget(engram_dram_fraction=0.04)                 # 80 GB per host: spread over the cluster
    spread = plan(topo, shape, loads, slots_per_device=12, memory=tight)
    assert spread.engram.level == "network" and spread.engram.n_shards == 4
    assert spread.engram.host_bytes.max() <= 2e12 * 0.04
    with pytest.raises(ValueError, match="engram: 1 copy of the 196 GB Engram tables do not fit"):
        plan(topo, shape, loads, slots_per_device=12, memory=MemoryBudget(engram_dram_fraction=0.01))


# ---- shapes, load files, CLI -----------------------------------------------------------------------------------------
def test_model_shapes(tiny_model_dir):
    pro = PRESETS["v4-pro"]
    assert pro.expert_bytes == 3 * 7168 * 3072 * (0.5 + 1 / 32) and pro.experts == 384 and pro.layers == 61
    shape = resolve_model(tiny_model_dir)
    from moemesh.kernels.config import ModelConfig

    cfg = ModelConfig.from_file(tiny_model_dir)
    assert (shape.experts, shape.layers, shape.top_k) == (cfg.n_routed_experts, cfg.num_hidden_layers,
                                                          cfg.num_experts_per_tok)
    assert shape.expert_bytes == 3 * cfg.hidden_size * cfg.moe_intermediate_size * (0.5 + 1 / 32)
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model("v5-ultra")


@pytest.mark.parametrize("suffix", [".npy", ".json", ".safetensors"])
def test_load_files_round_trip(tmp_path, suffix):
    x = zipf_loads(3, 16, 1.0, 100.0, 0)
    write_loads(tmp_path / f"l{suffix}", x)
    assert read_loads(tmp_path / f"l{suffix}") == pytest.approx(x, rel=1e-6)
    assert scale_loads(x, 6.0).sum(1) == pytest.approx([6.0] * 3)


def test_load_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"counts": [1, 2]}')
    with pytest.raises(ValueError, match="expected a key 'loads'"):
        read_loads(tmp_path / "bad.json")
    (tmp_path / "flat.json").write_text('{"loads": [1, 2]}')
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        read_loads(tmp_path / "flat.json")


def test_cli_prints_the_table_with_baselines(capsys, tmp_path):
    write_loads(tmp_path / "loads.npy", zipf_loads(43, 256, 0.6, 1.0, 0))
    ap = argparse.ArgumentParser()
    plan_cli.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["plan", "--topology", "hgx-h100", "--devices", "16", "--model", "v4-flash",
                          "--loads", str(tmp_path / "loads.npy"), "--compare"])
    assert plan_cli.run(args) == 0
    out = capsys.readouterr().out
    for word in ("balancedness", "slowest tier share", "moemesh", "eplb-global", "eplb-hier", "round-robin"):
        assert word in out
    args = ap.parse_args(["plan", "--topology", "hgx-h100", "--devices", "16", "--model", "v4-flash"])
    assert plan_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "moemesh" in out and "eplb-global" not in out  # baselines only with --compare
