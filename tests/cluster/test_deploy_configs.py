"""The files under deploy/ that users run: `ray up` cluster YAMLs, the KubeRay RayService, the Serve config file and
the Grafana dashboard. Each is checked with the validator its consumer uses (Ray's cluster schema, Serve's deploy
schema, our DeploymentConfig) and against the names our code declares. Fast: no Ray cluster is started."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import subprocess
from pathlib import Path
from types import FunctionType

import jsonschema
import pytest
import yaml

from moemesh.cluster.config import ConfigFileError, DeploymentConfig
from moemesh.cluster.serve.pinning import NODE_RESOURCE_PREFIX
from moemesh.cluster.serve_entry import app_builder
from moemesh.cluster.planner.topology import LABEL_PREFIX

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CLUSTER_YAMLS = sorted((DEPLOY / "clusters").glob("*.yaml"))
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
SERVE_APP = DEPLOY / "serve" / "serve-app.yaml"
DASHBOARD = DEPLOY / "grafana" / "moemesh.json"
# Metrics of the expert-replica autoscaler (exposed names), whose module lands separately.
AUTOSCALING_METRICS = {"moemesh:expert_replicas", "moemesh:autoscaler_decisions_total",
                       "moemesh:autoscaler_pending_replicas", "moemesh:expert_map_version", "moemesh:replica_actors"}


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# ---- ray up cluster configs ----------------------------------------------------------------------------------------
def _ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it touches any machine (ray.autoscaler._private.commands.
    _bootstrap_config): `prepare_config` (the provider's defaults, the local provider's node type); for an `external`
    provider, import its class and run its `fillout_available_node_types_resources` hook (built-in providers' hooks
    ask the cloud, and `ray up` only warns when they fail); then `validate_config` (ray-schema.json plus its
    cross-field checks). Returns the prepared config."""
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
    except KeyError as e:  # an `external` provider gets no defaults: setup_commands etc. must be written out
        pytest.fail(f"prepare_config: missing top-level key {e} (provider type {config['provider']['type']!r} "
                    "gets no defaults for it from Ray)", pytrace=False)
    provider = prepared["provider"]
    if provider["type"] == "external":
        module = provider.get("module", "<no provider.module>")
        try:
            provider_cls = _get_node_provider_cls(provider)
        except (ImportError, AttributeError, ValueError) as e:
            pytest.fail(f"provider.module {module!r} cannot be imported ({type(e).__name__}: {e}); `ray up` would "
                        "fail the same way", pytrace=False)
        prepared = provider_cls.fillout_available_node_types_resources(prepared)
    if "cluster_synced_files" not in prepared:  # validate_config's own message blames the Ray version
        pytest.fail("missing top-level key 'cluster_synced_files' (provider type "
                    f"{provider['type']!r} gets no default for it from Ray or from its provider's "
                    "fillout_available_node_types_resources; `[]` will do)", pytrace=False)
    validate_config(prepared)
    return prepared


def test_cluster_configs_exist():
    names = {p.name for p in CLUSTER_YAMLS}
    assert {"aws-gpu.yaml", "ascend-onprem.yaml"} <= names, names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_config_passes_ray_validation(path):
    _ray_up_checks(_load_yaml(path))


def _aws():
    return _load_yaml(DEPLOY / "clusters" / "aws-gpu.yaml")


def _ascend():
    return _load_yaml(DEPLOY / "clusters" / "ascend-onprem.yaml")


@pytest.mark.parametrize("load", [_aws, _ascend], ids=["aws-gpu", "ascend-onprem"])
@pytest.mark.parametrize("breakage", ["misspelled_key", "wrong_type"])
def test_broken_cluster_config_is_rejected(load, breakage):
    config = load()
    if breakage == "misspelled_key":
        config["idle_timeout_minute"] = config.pop("idle_timeout_minutes", 5)
    else:
        config["upscaling_speed"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        _ray_up_checks(config)


def test_ray_schema_wants_whole_resources():
    config = _aws()
    config["available_node_types"]["gpu-h100"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        _ray_up_checks(config)


def test_local_provider_refuses_node_types():
    """Why ascend-onprem.yaml puts resources and labels on the `ray start` lines."""
    import click

    config = _ascend()
    config["available_node_types"] = {"npu": {"resources": {"NPU": 8}, "node_config": {}}}
    with pytest.raises(click.ClickException):
        _ray_up_checks(config)


def _ray_start_args(commands: list[str]) -> list[dict]:
    """Run start commands in bash with `ray` (and CANN's set_env.sh) replaced by a recorder: the `--resources` JSON
    and `--labels-file` of each `ray start`, after the shell's quoting and `$(hostname -s)`."""
    script = "\n".join([
        'ray() { python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"; }',
        "ulimit() { :; }",
        "export RAY_HEAD_IP=10.0.0.1",
        *commands])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=30).stdout
    starts = []
    for line in out.splitlines():
        argv = json.loads(line)
        if argv[0] != "start":
            continue
        opts = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
        starts.append({"resources": json.loads(opts.get("resources", "{}")), "labels_file": opts.get("labels-file"),
                       "head": "--head" in argv})
    return starts


def _pins(resources: dict) -> list[str]:
    return [r for r in resources if r.startswith(NODE_RESOURCE_PREFIX)]


@pytest.mark.parametrize("load", [_aws, _ascend], ids=["aws-gpu", "ascend-onprem"])
def test_every_node_gets_one_pin_and_token_auth(load):
    config = _ray_up_checks(load())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        assert any("RAY_AUTH_MODE=token" in c for c in commands), key
        starts = _ray_start_args(commands)
        assert len(starts) == 1, (key, starts)
        assert starts[0]["head"] == (key == "head_start_ray_commands")
        pins = _pins(starts[0]["resources"])
        assert len(pins) == 1 and starts[0]["resources"][pins[0]] == 1, starts[0]
        assert len(pins[0]) > len(NODE_RESOURCE_PREFIX), pins   # the hostname was filled in


def test_aws_gpu_node_types_declare_their_gpus():
    types = _ray_up_checks(_aws())["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} == {"p5.48xlarge", "p5e.48xlarge"}
    for name, t in gpu.items():
        assert t["resources"]["GPU"] == 8, name          # 8 H100 / H200 per p5 / p5e instance
        assert t["max_workers"] >= t["min_workers"] >= 0, name


def test_ascend_workers_declare_npus_and_tier_labels():
    config = _ray_up_checks(_ascend())
    [start] = _ray_start_args(config["worker_start_ray_commands"])
    assert start["resources"]["NPU"] == 8
    assert start["labels_file"]                                   # per-node labels moemesh.io/<tier>
    text = (DEPLOY / "clusters" / "ascend-onprem.yaml").read_text()
    for tier in ("supernode", "cabinet"):                          # atlas950-superpod's labelled tiers
        assert f"{LABEL_PREFIX}{tier}" in text
    assert any("set_env.sh" in c for c in config["setup_commands"])
    assert any("[ascend]" in c for c in config["setup_commands"])


# ---- Serve config file and the import-path builder -----------------------------------------------------------------
def _check_builder_import_path(import_path: str):
    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    # Serve's rule for builders (ray.serve._private.api.call_user_app_builder_with_args_if_necessary)
    assert isinstance(builder, FunctionType) and len(inspect.signature(builder).parameters) == 1
    return builder


def test_serve_app_file_passes_serve_schema_and_our_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_load_yaml(SERVE_APP))
    [app] = schema.applications
    assert app.name == "moemesh"
    assert _check_builder_import_path(app.import_path) is app_builder
    DeploymentConfig.from_serve_args(app.args)


def test_app_builder_builds_the_app_without_ray(tiny_model_dir):
    import ray
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    was_running = ray.is_initialized()
    args = {**_load_yaml(SERVE_APP)["applications"][0]["args"], "model": str(tiny_model_dir)}
    app = call_user_app_builder_with_args_if_necessary(app_builder, args)   # how Serve calls it
    assert isinstance(app, Application)
    assert ray.is_initialized() == was_running


def test_app_builder_reads_a_config_file(tiny_model_dir, tmp_path):
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "experts": {"shards": 4}}))
    assert DeploymentConfig.from_serve_args({"config": str(path)}).experts.shards == 4


@pytest.mark.parametrize("args, match", [
    ({"model": "tiny", "atention": {"replicas": 2}}, "atention"),
    ({"attention": {"replicas": "two"}}, "attention.replicas"),
    ({"config": "x.yaml", "model": "tiny"}, "model"),
    ({"config": 3}, "config"),
    ({"config": "/nonexistent/moemesh.yaml"}, "no such file"),
])
def test_bad_serve_args_name_the_field(args, match):
    with pytest.raises(ConfigFileError, match=match):
        DeploymentConfig.from_serve_args(args)


# ---- KubeRay RayService --------------------------------------------------------------------------------------------
def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayservice_manifest_has_the_required_fields():
    from ray.serve.schema import ServeDeploySchema

    doc = _load_yaml(RAYSERVICE)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])           # a string holding YAML, as KubeRay wants
    schema = ServeDeploySchema.model_validate(serve_config)
    for app in schema.applications:
        _check_builder_import_path(app.import_path)
        DeploymentConfig.from_serve_args(app.args)
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())   # KubeRay: string values only
    assert _containers(head) and all(c.get("image") for c in _containers(head))
    groups = cluster["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict), g.get("groupName")
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["groupName"]
        for c in _containers(g):
            assert c.get("image"), g["groupName"]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) > 0, g["groupName"]


def test_rayservice_pods_get_their_own_pin():
    """Kubernetes expands `$(VAR)` only from variables defined earlier in the same container's env."""
    for g in _load_yaml(RAYSERVICE)["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for c in _containers(g):
            env = c["env"]
            names = [e["name"] for e in env]
            override = next(e["value"] for e in env if e["name"] == "RAY_OVERRIDE_RESOURCES")
            resources = json.loads(override)
            [pin] = _pins(resources)
            assert resources[pin] == 1
            for ref in re.findall(r"\$\((\w+)\)", pin):
                assert ref in names[:names.index("RAY_OVERRIDE_RESOURCES")], (g["groupName"], ref)


# ---- Grafana dashboard ---------------------------------------------------------------------------------------------
_DECLARATION = re.compile(r"\b(Histogram|Summary|Counter|Gauge|CounterMetricFamily|GaugeMetricFamily|"
                          r"HistogramMetricFamily|_counter)\(\s*\"(moemesh:[A-Za-z0-9_:]+)\"")
_MOEMESH_NAME = re.compile(r"moemesh:[A-Za-z0-9_:]+")
_PROCESS_NAME = re.compile(r"\bprocess_[a-z_]+")


def _exposed_names(kind: str, name: str) -> set[str]:
    """The sample names prometheus-client exposes for a metric declared as `kind(name, ...)`."""
    if kind in ("Histogram", "HistogramMetricFamily"):
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "Summary":
        return {f"{name}_sum", f"{name}_count"}
    if kind in ("Counter", "CounterMetricFamily", "_counter"):       # `_counter` builds a CounterMetricFamily
        return {f"{name.removesuffix('_total')}_total"}
    return {name}


def _declared_metric_names() -> set[str]:
    names = set()
    for folder in ("actors", "cluster"):
        for path in (REPO / folder).rglob("*.py"):
            for kind, name in _DECLARATION.findall(path.read_text()):
                names |= _exposed_names(kind, name)
    return names


def _process_metric_names() -> set[str]:
    """What prometheus-client's ProcessCollector (registered by every role) exposes on this machine."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return {s.name for family in registry.collect() for s in family.samples}


def _panels(dashboard: dict):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])                              # panels inside collapsed rows


def _queries(dashboard: dict):
    """(where, PromQL) of every panel target and every query variable."""
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} target {t.get('refId')}", t["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']!r}", q


def test_dashboard_panels_are_complete():
    dashboard = json.loads(DASHBOARD.read_text())
    ds_vars = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds_vars] == [("datasource", "prometheus")]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    data_panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(data_panels) >= 10
    for p in data_panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}", p["title"]
        assert set(p["gridPos"]) >= {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_dashboard_uses_only_declared_metrics():
    known = _declared_metric_names() | AUTOSCALING_METRICS
    process = _process_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for where, expr in _queries(dashboard):
        names = _MOEMESH_NAME.findall(expr) + _PROCESS_NAME.findall(expr)
        assert names, f"{where}: no moemesh or process metric in {expr!r}"
        unknown = [n for n in names if n not in (process if n.startswith("process_") else known)]
        assert not unknown, f"{where}: unknown metric(s) {unknown} in {expr!r}"
        used.update(names)
    # every panel group the dashboard promises is there
    for name in ("moemesh:time_to_first_token_seconds_bucket", "moemesh:time_per_output_token_seconds_bucket",
                 "moemesh:generation_tokens_total", "moemesh:expert_tokens_total", "moemesh:dispatch_bytes_total",
                 "moemesh:engram_lookup_seconds_bucket", "moemesh:engram_cache_hits_total",
                 "moemesh:engram_failovers_total", "moemesh:kv_cache_usage_perc", *AUTOSCALING_METRICS):
        assert name in used, name


def test_metric_name_check_catches_a_typo():
    known = _declared_metric_names()
    assert "moemesh:expert_tokens_total" in known and "moemesh:expert_tokens" not in known
    assert "moemesh:time_to_first_token_seconds_bucket" in known
    assert "moemesh:time_to_first_token_seconds" not in known      # a histogram has no bare sample
