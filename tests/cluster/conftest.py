"""One real multi-node Ray cluster (and one moemesh deployment on it) per test session.

`ray.cluster_utils.Cluster` starts three Ray nodes on this machine standing in for three hosts; custom resources mark
them (`head_node`, `expert_node`, `engram_node`) and the deployment config pins roles to them. Each node also carries
its pin resource `moemesh.io/node:<marker>` and the worker nodes logical NPUs (expert_node 2, engram_node 1) that
nothing asks for: the devices a plan is made for (tests/cluster/test_plan_apply.py). Never `ray stop`:
everything started here is stopped with `serve.shutdown()` / `Cluster.shutdown()`.
"""

from __future__ import annotations

import os
import secrets
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60: token auth stays on; our nodes share this token
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray
    from ray.cluster_utils import Cluster

    def pin(name: str) -> dict:  # each node's own resource, what cluster/plan_apply.py pins processes with
        return {f"moemesh.io/node:{name}": 1}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6,
                                                            "resources": {"head_node": 100, **pin("head")}})
    nodes = {"head_node": cluster.head_node,
             "expert_node": cluster.add_node(num_cpus=6, resources={"expert_node": 100, "NPU": 2, **pin("expert")}),
             "engram_node": cluster.add_node(num_cpus=6, resources={"engram_node": 100, "NPU": 1, **pin("engram")})}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="moemesh-tests")
    yield cluster, {name: node.node_id for name, node in nodes.items()}
    ray.shutdown()
    cluster.shutdown()


SERVE_CONFIG = {
    "attention": {"replicas": 2, "max_num_seqs": 8, "kv_cache_blocks": 2048, "block_size": 16,
                  "placement": {"num_cpus": 1, "resources": {"head_node": 1}}},
    "experts": {"shards": 3, "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}}},
    "engram": {"shards": 2, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny"},
}


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_model_dir):
    """The tiny model deployed on the cluster: (base URL, DeploymentConfig, node ids by marker)."""
    from ray import serve

    from moemesh.cluster.app import deploy
    from moemesh.cluster.config import DeploymentConfig

    _, node_ids = ray_cluster
    port = _free_port()
    config = DeploymentConfig.from_dict({**SERVE_CONFIG, "model": str(tiny_model_dir),
                                         "ingress": {**SERVE_CONFIG["ingress"], "port": port}})
    url = deploy(config)
    yield url, config, node_ids
    serve.shutdown()
