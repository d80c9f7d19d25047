"""Accelerator checks before deploying (cluster/preflight.py) and the device/resource rule of `Placement`."""

from __future__ import annotations

import pytest

from moemesh.cluster.config import ConfigFileError, DeploymentConfig
from moemesh.cluster.preflight import accelerator_shortfall, check_accelerators, requested_accelerators

GPU = {"num_gpus": 1, "device": "cuda"}
NPU = {"resources": {"NPU": 1}, "device": "npu"}


def test_requested_accelerators_sum_every_process():
    config = DeploymentConfig.from_dict({
        "attention": {"replicas": 3, "placement": {"num_gpus": 0.5, "device": "cuda"}},
        "experts": {"assignment": [{"experts": {0: [0]}, "placement": GPU}, {"experts": {0: [1]}}],
                    "placement": NPU},
        "engram": {"shards": 2, "replicas": 2}})
    # 3 x 0.5 GPU + shard 0's own GPU; shard 1 takes the experts' default placement (1 NPU); Engram: host DRAM
    assert requested_accelerators(config) == {"GPU": 2.5, "NPU": 1.0}


def test_check_accelerators_names_what_is_missing():
    config = DeploymentConfig.from_dict({"attention": {"replicas": 2, "placement": GPU}, "experts": {"shards": 1}})
    check_accelerators(config, {"GPU": 2.0, "CPU": 8.0})
    with pytest.raises(ConfigFileError, match="requests 2 GPU but the cluster has 1"):
        check_accelerators(config, {"GPU": 1.0})


@pytest.mark.parametrize("placement, message", [
    ({"device": "cuda"}, "device: 'cuda' needs num_gpus > 0"),
    ({"device": "npu"}, "device: 'npu' needs resources.NPU > 0"),
    ({"num_gpus": 1}, "device: 'cpu' with num_gpus=1"),
])
def test_a_device_needs_its_ray_resource(placement, message):
    with pytest.raises(ConfigFileError, match=message):
        DeploymentConfig.from_dict({"attention": {"placement": placement}})


def test_accelerator_shortfall_names_only_what_is_missing():
    assert accelerator_shortfall({"GPU": 8, "CPU": 99}, {"GPU": 8.0}) is None
    msg = accelerator_shortfall({"GPU": 0, "NPU": 16}, {"CPU": 8})
    assert "requests 16 NPU but the cluster has 0" in msg and "GPU" not in msg


def test_the_attention_pool_counts_with_its_minimum():
    config = DeploymentConfig.from_dict({"attention": {"replicas": 1, "placement": GPU,
                                                       "autoscaling": {"min_replicas": 2, "max_replicas": 3}}})
    assert requested_accelerators(config)["GPU"] == 3.0  # 1 fixed rank + 2 pool replicas that always run
