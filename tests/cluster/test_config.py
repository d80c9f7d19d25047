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


def test_each_shard_takes_its_own_placement_else_the_default():
    from moemesh.cluster.serve.app import required_cpus

    config = DeploymentConfig.from_dict({"experts": {
        "assignment": [{"experts": {0: [0]}, "placement": {"num_cpus": 3}}, {"experts": {0: [1]}}],
        "placement": {"num_cpus": 0.5}}})
    assert [p.num_cpus for p in config.experts.shard_placements()] == [3, 0.5]
    assert [p.num_cpus for p in DeploymentConfig().experts.shard_placements()] == [1.0, 1.0]  # `shards: 2`
    # 1 attention rank + both shards + 2 Engram shards (1 CPU each) + the ingress's 0.5
    assert required_cpus(config) == 1 + 3.5 + 2 + 0.5


# ---- security settings (docs/security.md) ----------------------------------------------------------------------------
KEY = "sk-config-0123456789abcdef"


def test_api_keys_from_the_file_and_the_environment(monkeypatch):
    monkeypatch.setenv("MOEMESH_TEST_KEYS", f" {KEY}2 , ,{KEY}3,{KEY}")
    config = DeploymentConfig.from_dict({"ingress": {"api_keys": [KEY], "api_keys_env": "MOEMESH_TEST_KEYS"}})
    assert config.ingress.api_key_list() == [KEY, f"{KEY}2", f"{KEY}3"]
    assert KEY not in repr(config) and KEY not in str(config.model_dump())
    assert DeploymentConfig().ingress.api_key_list() == []  # the default: an open API
    monkeypatch.delenv("MOEMESH_TEST_KEYS")
    with pytest.raises(ConfigFileError, match="MOEMESH_TEST_KEYS.*not set"):
        config.ingress.api_key_list()
    monkeypatch.setenv("MOEMESH_TEST_KEYS", "tooshort")
    with pytest.raises(ConfigFileError, match="at least 16") as err:
        config.ingress.api_key_list()
    assert "tooshort" not in str(err.value)


@pytest.mark.parametrize("bad", ["short-key", "a key with spaces in it", "comma,separated-keys-here"])
def test_unsound_api_keys_are_refused_without_echoing_them(bad):
    with pytest.raises(ConfigFileError, match=r"ingress: .*api_keys\[1\]: a key must be") as err:
        DeploymentConfig.from_dict({"ingress": {"api_keys": [KEY, bad]}})
    assert bad not in str(err.value)


def test_ingress_limits_are_checked_when_the_file_loads():
    with pytest.raises(ConfigFileError, match="ingress.limits.max_in_flight"):
        DeploymentConfig.from_dict({"ingress": {"limits": {"max_in_flight": 0}}})
    with pytest.raises(ConfigFileError, match="ingress.limits.bogus"):
        DeploymentConfig.from_dict({"ingress": {"limits": {"bogus": 1}}})
    limits = DeploymentConfig.from_dict({"ingress": {"limits": {"max_concurrent_per_key": 3}}}).ingress.limits
    assert limits.max_concurrent_per_key == 3 and limits.max_in_flight == 256


def test_the_cluster_token_is_generated_per_deploy_unless_configured(monkeypatch):
    config = DeploymentConfig()
    first, second = config.grpc_security(), config.grpc_security()
    assert len(first.token) >= 40 and first.token != second.token and first.tls is None
    assert first.token not in repr(first)
    monkeypatch.setenv("MOEMESH_TEST_TOKEN", "cluster-token-from-env-0123")
    assert DeploymentConfig(grpc_token_env="MOEMESH_TEST_TOKEN").grpc_security().token == "cluster-token-from-env-0123"
    monkeypatch.delenv("MOEMESH_TEST_TOKEN")
    with pytest.raises(ConfigFileError, match=r"grpc_token_env: \$MOEMESH_TEST_TOKEN must be set"):
        DeploymentConfig(grpc_token_env="MOEMESH_TEST_TOKEN").grpc_security()


def test_grpc_tls_files_must_exist_and_be_pem(tmp_path):
    pem = tmp_path / "node.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (tmp_path / "plain.txt").write_text("not a certificate")
    good = {"cert_file": str(pem), "key_file": str(pem), "ca_file": str(pem)}
    tls = DeploymentConfig.from_dict({"grpc_tls": {**good, "mutual": True}}).grpc_security().tls
    assert tls.cert_file == str(pem) and tls.mutual and tls.server_name is None
    for field, path, needle in (("ca_file", tmp_path / "missing.pem", "no such file"),
                                ("key_file", tmp_path / "plain.txt", "not a PEM file")):
        with pytest.raises(ConfigFileError, match=f"grpc_tls.{field}: .*{needle}"):
            DeploymentConfig.from_dict({"grpc_tls": {**good, field: str(path)}})


def test_a_serve_config_file_reads_its_app_args_and_http_address(tmp_path):
    """`moemesh serve serve-app.yaml`: the moemesh application's args (here `{config: PATH}`, relative to the file)
    and `http_options` as the ingress address; the args follow Serve's rules (serve_entry.app_builder)."""
    (tmp_path / "deployment.yaml").write_text("experts: {shards: 4}\ningress: {port: 9000, model_name: m}")
    app = "{import_path: moemesh.cluster.serve_entry:app_builder, args: %s}"
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(f"http_options: {{port: 8123}}\napplications: [{app % '{config: deployment.yaml}'}]")
    config = DeploymentConfig.from_yaml(serve_file)
    assert (config.experts.shards, config.ingress.port, config.ingress.model_name) == (4, 8123, "m")
    serve_file.write_text(f"applications: [{app % '{config: deployment.yaml, model: tiny}'}]")
    with pytest.raises(ConfigFileError, match=r"serve.yaml: applications\[\]\.args: `config` .* excludes"):
        DeploymentConfig.from_yaml(serve_file)
