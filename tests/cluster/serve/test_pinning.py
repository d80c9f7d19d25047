"""Plan -> deployment: a hand-made topology without Ray (pure), then the tiny model planned onto the session's Ray
cluster, deployed as a second Serve app, every shard and worker checked against the node the plan chose."""

import numpy as np
import pytest

from moemesh.cluster.config import DeploymentConfig
from moemesh.cluster.serve.pinning import (PIN_AMOUNT, PlanApplyError, expected_nodes, node_pin_resources,
                                        node_resource, plan_to_deployment, shard_experts)
from moemesh.cluster.planner.shape import ModelShape
from moemesh.cluster.planner.plan import MemoryBudget, plan
from moemesh.cluster.planner.topology import topology_from_ray_nodes, validate_spec

NO_KV = MemoryBudget(sequences_per_rank=0, reserve_fraction=0.0)
CPU_SPEC = {"name": "cpu-test", "devices": 4,
            "device": {"kind": "X", "ray_resource": "NPU", "memory": "100 GB", "flops": 1e15, "hbm_bandwidth": 1e12},
            "host": {"devices": 2, "dram": "1 TB"},
            "tiers": [{"name": "node", "devices": 2, "fabric": "ub", "bandwidth": 100e9, "latency": 1e-6},
                      {"name": "network", "fabric": "rdma", "bandwidth": 10e9, "latency": 5e-6}]}


def small_case(ranks=1, engram=1e9):
    """4 devices on 2 hosts, 2 layers x 4 experts, 2 slots per device, one EP group."""
    topo = validate_spec(CPU_SPEC).expand()
    shape = ModelShape(name="t", layers=2, experts=4, top_k=1, hidden=1000, expert_width=1000, expert_bytes=1e6,
                       dense_bytes=0, kv_bytes_per_token=0, engram_table_bytes=engram)
    loads = np.array([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 5.0]])
    return topo, plan(topo, shape, loads, attention_ranks=ranks, slots_per_device=2, ep_domain="network",
                      memory=NO_KV)


def test_one_pinned_shard_per_device_holding_the_plans_experts():
    topo, p = small_case()
    config = plan_to_deployment(p, topo, DeploymentConfig(), {"NPU": 1})
    shards = config.experts.assignment
    assert len(shards) == 4                                     # every device holds replicas
    for d, spec in enumerate(shards):
        for layer in range(2):
            want = sorted(set(p.replica_expert[layer][p.replica_device[layer] == d].tolist()))
            assert spec.experts.get(layer, []) == want
        assert spec.placement.resources == {node_resource(str(topo.host[d])): PIN_AMOUNT, "NPU": 1}
        assert spec.placement.device == "npu"
    # every expert of every layer held: the config's own check accepts it
    held = config.experts.resolve([0, 1], 4)
    assert all({e for s in held for e in s[layer]} == {0, 1, 2, 3} for layer in range(2))


def test_attention_and_engram_follow_the_plan():
    topo, p = small_case()
    att_host = int(topo.host[p.attention_device[0]])
    config = plan_to_deployment(p, topo, DeploymentConfig(), {"GPU": 0.5})
    assert config.attention.replicas == 1
    assert config.attention.placement.num_gpus == 0.5 and config.attention.placement.device == "cuda"
    assert config.attention.placement.resources == {node_resource(str(att_host)): PIN_AMOUNT}
    # Engram fits on every host (level "host"): the copy in the attention rank's host is deployed, on host DRAM
    assert p.engram.level == "host"
    assert (config.engram.shards, config.engram.replicas) == (1, 1)
    assert config.engram.placement.resources == {node_resource(str(att_host)): PIN_AMOUNT}
    assert config.engram.placement.num_gpus == 0
    names = expected_nodes(config)
    assert names["attention-worker-0"] == names["engram-shard-0-0"] == node_resource(str(att_host))
    assert len([n for n in names if n.startswith("expert-shard-")]) == 4


def test_custom_host_resources_and_base_settings_are_kept():
    topo, p = small_case()
    base = DeploymentConfig.from_dict({"model": "/m", "experts": {"shards": 2, "batch_wait_ms": 5,
                                                                  "placement": {"num_cpus": 0.25}}})
    config = plan_to_deployment(p, topo, base, {}, host_resources=["moemesh.io/node:a", "moemesh.io/node:b"])
    assert config.model == "/m" and config.experts.batch_wait_ms == 5 and config.experts.shards is None
    assert {s.placement.num_cpus for s in config.experts.assignment} == {0.25}
    assert {next(iter(s.placement.resources)) for s in config.experts.assignment} == \
        {"moemesh.io/node:a", "moemesh.io/node:b"}
    with pytest.raises(PlanApplyError, match="host_resources: 1 names for 2 hosts"):
        plan_to_deployment(p, topo, base, {}, host_resources=["x"])


def test_ranks_on_several_hosts_are_refused_with_the_hosts():
    topo, p = small_case(ranks=2)                 # ranks at devices 1 and 3: two hosts
    with pytest.raises(PlanApplyError, match="attention ranks: the plan puts them on 2 hosts"):
        plan_to_deployment(p, topo, DeploymentConfig(), {})


def test_an_expert_without_a_replica_is_refused():
    topo, p = small_case()
    p.replica_expert[1] = np.where(p.replica_expert[1] == 2, 3, p.replica_expert[1])   # layer 1 loses expert 2
    with pytest.raises(PlanApplyError, match=r"layer 1 experts \[2\] have no replica"):
        plan_to_deployment(p, topo, DeploymentConfig(), {})


def test_shard_experts_lists_each_expert_once_per_device():
    _, p = small_case()
    p.replica_expert[0, :2] = 0                    # device 0 holds expert 0 twice in layer 0
    assert shard_experts(p)[0][0] == [0]


def test_node_pin_resources_from_ray_nodes():
    nodes = [{"NodeID": "aa", "Alive": True, "Resources": {"NPU": 2, "moemesh.io/node:n0": 1}},
             {"NodeID": "bb", "Alive": True, "Resources": {"NPU": 2, "moemesh.io/node:n1": 1}},
             {"NodeID": "cc", "Alive": True, "Resources": {"CPU": 4}}]
    topo = topology_from_ray_nodes(nodes, validate_spec(CPU_SPEC))
    assert node_pin_resources(nodes, topo) == ["moemesh.io/node:n0", "moemesh.io/node:n1"]
    del nodes[1]["Resources"]["moemesh.io/node:n1"]
    with pytest.raises(PlanApplyError, match="has 0 moemesh.io/node:<name> resources"):
        node_pin_resources(nodes, topo)


# ---- on the session's Ray cluster ------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_a_planned_deployment_runs_where_the_plan_put_it(served, tiny_model_dir):
    """The cluster's NPU nodes (expert_node: 2, engram_node: 1; logical) are the topology; the tiny model is planned
    onto it with one attention rank and deployed next to the session's app; every process reports its node."""
    import ray
    from ray import serve

    from moemesh.cluster.serve.app import build_app
    from moemesh.kernels.config import ModelConfig

    nodes = ray.nodes()
    topo = topology_from_ray_nodes(nodes, validate_spec(CPU_SPEC))     # the preset gives device facts only
    assert topo.n_devices == 3 and topo.n_hosts == 2
    shape = ModelShape.from_config(ModelConfig.from_file(tiny_model_dir))
    loads = np.random.default_rng(0).random((shape.layers, shape.experts)) + 0.1
    p = plan(topo, shape, loads, attention_ranks=1, slots_per_device=8, memory=NO_KV)
    base = DeploymentConfig.from_dict({
        "model": str(tiny_model_dir), "attention": {"max_num_seqs": 4, "kv_cache_blocks": 256,
                                                    "placement": {"num_cpus": 0.5}},
        "experts": {"shards": 1, "placement": {"num_cpus": 0.5}}, "engram": {"placement": {"num_cpus": 0.5}}})
    config = plan_to_deployment(p, topo, base, {}, host_resources=node_pin_resources(nodes, topo))
    assert len(config.experts.assignment) == 3 and config.attention.replicas == 1
    node_of_resource = {r: n["NodeID"] for n in nodes for r in n["Resources"] if r.startswith("moemesh.io/node:")}
    expected = expected_nodes(config)
    try:
        serve.run(build_app(config), name="moemesh-plan", route_prefix="/plan")
        for deployment, resource in expected.items():
            handle = serve.get_deployment_handle(deployment, app_name="moemesh-plan")
            assert handle.node_id.remote().result(timeout_s=60) == node_of_resource[resource], deployment
        # the plan's host for each shard is the Ray node the device came from
        for i, d in enumerate(shard_experts(p)):
            assert node_of_resource[expected[f"expert-shard-{i}"]] == topo.host_names[topo.host[d]]
    finally:
        serve.delete("moemesh-plan")
