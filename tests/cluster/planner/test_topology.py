"""Topology presets, validation errors, expansion, and discovery from Ray node lists (fake dicts, no Ray)."""

import re

import numpy as np
import pytest
import yaml

from moemesh.cluster.planner.topology import (PRESET_DIR, TopologyError, load_topology, load_topology_spec,
                                              parse_quantity, topology_from_ray_nodes, validate_spec)

PRESETS = {  # name: (devices, hosts, domains per tier)
    "atlas950-superpod": (8192, 1024, [1024, 128, 1, 1]),
    "cloudmatrix384": (384, 48, [48, 1, 1]),
    "hgx-h100": (256, 32, [32, 1]),
    "hgx-h200": (1024, 128, [128, 1]),
    "gb200-nvl72": (288, 72, [4, 1]),
}


def small_spec(**change) -> dict:
    spec = {"name": "t", "devices": 8,
            "device": {"kind": "X", "memory": "80 GB", "flops": "1 PFLOP/s", "hbm_bandwidth": "3 TB/s"},
            "host": {"devices": 2, "dram": "1 TB"},
            "tiers": [{"name": "node", "devices": 4, "fabric": "nvlink", "bandwidth": "450 GB/s", "latency": "2 us"},
                      {"name": "network", "fabric": "ib", "bandwidth": "400 Gb/s", "latency": "5 us"}]}
    for path, value in change.items():
        node = spec
        *head, last = path.split(".")
        for key in head:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return spec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_expand_to_the_right_counts(name):
    devices, hosts, domains = PRESETS[name]
    topo = load_topology(name)
    assert topo.n_devices == devices and topo.n_hosts == hosts
    assert [topo.n_domains(t) for t in range(topo.n_tiers)] == domains
    assert (topo.memory > 0).all() and (topo.tier_bandwidth > 0).all()


def test_preset_files_cite_a_source_for_every_number():
    for path in PRESET_DIR.glob("*.yaml"):
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            if re.search(r":\s*[0-9]", code) and not re.search(r"^\s*(devices|name)", code):
                assert "#" in line, f"{path.name}: no source comment on {line.strip()!r}"
        assert yaml.safe_load(path.read_text())["name"] == path.stem


def test_preset_figures():
    h200 = load_topology_spec("hgx-h200")
    assert h200.device.memory == 141e9 and h200.device.hbm_bandwidth == 4.8e12
    assert h200.tiers[0].bandwidth == 450e9 and h200.tiers[1].bandwidth == 50e9     # 400 Gb/s
    nvl = load_topology_spec("gb200-nvl72")
    assert nvl.tiers[0].devices == 72 and nvl.tiers[0].bandwidth == 900e9
    atlas = load_topology_spec("atlas950-superpod")
    assert atlas.devices == 8192 and atlas.tiers[1].devices == 64
    cm = load_topology_spec("cloudmatrix384")
    assert cm.tiers[1].bandwidth == 392e9 and cm.tiers[2].bandwidth == 50e9


def test_units():
    assert parse_quantity("400 Gb/s", "rate") == 50e9
    assert parse_quantity("900 GB/s", "rate") == 900e9
    assert parse_quantity("141 GB", "bytes") == 141e9
    assert parse_quantity("1 GiB", "bytes") == 2**30
    assert parse_quantity("1979 TFLOP/s", "flops") == 1979e12
    assert parse_quantity("2.1 us", "time") == pytest.approx(2.1e-6)
    assert parse_quantity(5, "time") == 5.0


@pytest.mark.parametrize("change, field, value", [
    ({"device.memory": "141 GiBs"}, "device.memory", "141 GiBs"),
    ({"tiers.1.bandwidth": "fast"}, "tiers.1.bandwidth", "fast"),
    ({"tiers.0.devices": 3}, "tiers[0].devices", "3"),
    ({"host.devices": 3}, "tiers[0].devices", "3"),
    ({"devices": 10}, "tiers[1].devices", "10"),
    ({"device.colour": "red"}, "device.colour", "red"),
    ({"tiers.0.latency": -1}, "tiers.0.latency", "-1"),
])
def test_bad_topology_names_field_and_value(change, field, value):
    with pytest.raises(TopologyError) as err:
        validate_spec(small_spec(**change), source="my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml: ") and field in msg and value in msg, msg


def test_bad_yaml_file_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(small_spec(**{"tiers.0.name": "Node!"})))
    with pytest.raises(TopologyError, match=r"bad.yaml: tiers.0.name: .*Node!"):
        load_topology_spec(bad)
    with pytest.raises(TopologyError, match="no preset of that name"):
        load_topology_spec("no-such-cluster")


def test_resize_and_pair_tiers():
    topo = load_topology("hgx-h200", devices=64)
    assert topo.n_devices == 64 and topo.n_domains(0) == 8
    a, b = np.array([0, 0, 0]), np.array([0, 7, 8])
    assert topo.pair_tier(a, b).tolist() == [0, 1, 2]       # same device, NVSwitch, InfiniBand
    assert topo.slowest_tier() == 1 and topo.tier_names[1] == "network"
    single = validate_spec(small_spec(devices=4)).expand()   # one node: the network tier carries nothing
    assert single.active_tiers() == [0] and single.slowest_tier() == 0


# ---- Ray discovery ---------------------------------------------------------------------------------------------------
def ray_node(node_id, gpus=0, npus=0, labels=None, resources=None, alive=True):
    res = {"CPU": 64.0, **({"GPU": float(gpus)} if gpus else {}), **({"NPU": float(npus)} if npus else {}),
           **(resources or {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": f"10.0.0.{len(node_id)}", "Resources": res,
            "Labels": labels or {}}


def test_discovery_from_labels_orders_nodes_by_domain():
    nodes = [ray_node("head"),                                                    # no GPU: skipped
             ray_node("n3", gpus=4, labels={"moemesh.io/domain": "rack-b"}),
             ray_node("n1", gpus=4, labels={"moemesh.io/domain": "rack-a"}),
             ray_node("n2", gpus=4, labels={"moemesh.io/domain": "rack-a"}),
             ray_node("dead", gpus=4, labels={"moemesh.io/domain": "rack-a"}, alive=False)]
    topo = topology_from_ray_nodes(nodes, "gb200-nvl72")
    assert topo.n_devices == 12 and topo.n_hosts == 3
    assert topo.host_names == ("n1", "n2", "n3")
    assert topo.domain[0].tolist() == [0] * 8 + [1] * 4                          # rack-a, then rack-b
    assert topo.domain[1].tolist() == [0] * 12
    assert topo.memory[0] == 186e9 and topo.tier_names == ("domain", "network")


def test_discovery_from_custom_resources_and_node_tier():
    nodes = [ray_node(f"n{i}", npus=8, resources={f"moemesh.io/supernode:sp{i // 2}": 1.0}) for i in range(4)]
    topo = topology_from_ray_nodes(nodes, "cloudmatrix384")
    assert topo.n_devices == 32 and topo.kind[0] == "Ascend-910C"
    assert topo.domain[0].tolist() == np.repeat(np.arange(4), 8).tolist()        # tier `node` = the Ray node
    assert topo.domain[1].tolist() == np.repeat(np.arange(2), 16).tolist()       # supernodes from resources


def test_discovery_errors_name_the_node_and_label():
    with pytest.raises(TopologyError, match=r"n1.*no label moemesh.io/supernode"):
        topology_from_ray_nodes([ray_node("n1", npus=8)], "cloudmatrix384")
    with pytest.raises(TopologyError, match="no alive node has a 'GPU'"):
        topology_from_ray_nodes([ray_node("n1", npus=8)], "hgx-h100")
    nodes = [ray_node("a", npus=8, labels={"moemesh.io/cabinet": "c1", "moemesh.io/supernode": "s1"}),
             ray_node("b", npus=8, labels={"moemesh.io/cabinet": "c1", "moemesh.io/supernode": "s2"})]
    with pytest.raises(TopologyError, match=r"moemesh.io/cabinet='c1' appears in two supernode domains"):
        topology_from_ray_nodes(nodes, "atlas950-superpod")
