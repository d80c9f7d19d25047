"""Deployment config: the shipped YAMLs load, expert assignments resolve, bad files name the field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.cluster.config import ConfigFileError, DeploymentConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_configs_load_and_cover_every_expert(path):
    config = DeploymentConfig.from_yaml(path)
    shards = config.experts.resolve(list(range(4)), 16)  # the tiny model's shape
    for layer in range(4):
        assert {e for held in shards for e in held.get(layer, [])} == set(range(16))


def test_replicated_expert_appears_in_two_shards():
    config = DeploymentConfig.from_yaml(ROOT / "deploy" / "serve" / "explicit-experts.yaml")
    shards = config.experts.resolve(list(range(4)), 16)
    assert sum(3 in held.get(1, []) for held in shards) == 2


@pytest.mark.parametrize("text, needle", [
    ("attention: {replicas: 0}", "attention.replicas"),
    ("attention: {replicas: two}", "'two'"),
    ("experts: {shards: 2, assignment: []}", "exactly one"),
    ("ingress: {port: 70000}", "ingress.port"),
    ("bogus: 1", "bogus"),
    ("attention: {placement: {device: tpu}}", "'tpu'"),
    ("- just a list", "mapping"),
    ("attention: [", "YAML"),
])
def test_bad_files_name_the_field_and_value(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match="bad.yaml") as err:
        DeploymentConfig.from_yaml(path)
    assert needle in str(err.value)


def test_an_assignment_missing_experts_is_refused():
    config = DeploymentConfig.from_dict({"experts": {"assignment": [{"experts": {0: [0, 1]}}]}})
    with pytest.raises(ConfigFileError, match=r"layer 0 experts \[2, 3\]"):
        config.experts.resolve([0], 4)
