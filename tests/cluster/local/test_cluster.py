"""The local cluster (cluster/local/provider.py, cluster/local/cluster.py).

First the command runner and node stopping on plain processes (seconds, no Ray cluster). Then `ray up` / `ray down`
with deploy/clusters/local.yaml: a real multi-node cluster on this machine whose real Ray autoscaler adds a worker
node for an actor that needs one and removes it once idle, and whose `ray down` leaves no process of it behind and
touches no other Ray cluster (a bystander cluster started here, which a plain `ray stop` would kill, must survive).
It runs on a copy of the YAML with its own name, free ports and a 15 s idle timeout, so it never meets a user's
cluster; whatever happens, the finalizers stop its processes and the bystander's, by session and marker, not by name.
About 1.5 minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moemesh.cluster.local.cluster import ENV_CLUSTER, ENV_NODE, KIND_TAG, LocalCluster, cluster_dir

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[3]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]

# The client: an actor only an `expert_node` can hold appears on a node the autoscaler launches for it; once the
# actor is gone the node is removed. Prints `RESULT <json>` (Ray prints autoscaler events to stdout too).
CLIENT = """
import json, sys, time
import ray

ray.init()
alive = lambda: {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
before = alive()

@ray.remote(num_cpus=0, resources={"expert_node": 1})
class Probe:
    def node(self):
        return ray.get_runtime_context().get_node_id()

t0 = time.time()
probe = Probe.remote()
node_id = ray.get(probe.node.remote(), timeout=120)
node = alive()[node_id]
up_s = time.time() - t0
ray.kill(probe)
t1 = time.time()
while node_id in alive() and time.time() - t1 < 150:  # a condition wait, bounded
    time.sleep(0.5)
print("RESULT", json.dumps({"before": list(before), "node_id": node_id, "resources": node["Resources"],
                  "labels": node["Labels"], "up_s": up_s, "removed": node_id not in alive(),
                  "down_s": time.time() - t1}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.getsid(int(name)) == sid:
                out.append(int(name))
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_session(sid: int, grace_s: float = 3.0) -> None:
    """SIGTERM every live process of session `sid`, wait (bounded) until they are gone, SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(_alive(pid) for pid in _session_pids(sid)) and time.monotonic() < deadline:
            time.sleep(0.1)


def _cluster_processes(path: Path, sessions: set[int]) -> list[str]:
    """Processes still belonging to the cluster at `path`: in one of its sessions, marked with it, or naming it."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid() or not _alive(int(name)):
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            sid = os.getsid(int(name))
        except OSError:
            continue
        if sid in sessions or f"{ENV_CLUSTER}={path}".encode() in environ or f"{path}/".encode() in cmdline:
            found.append(f"{name}: {cmdline[:160]!r}")
    return found


def _ray(args: list[str], log: Path, env: dict, timeout: float) -> None:
    with open(log, "w") as out:
        rc = subprocess.run(RAY + args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                            timeout=timeout).returncode
    assert rc == 0, f"ray {args[0]} failed ({rc}):\n{log.read_text()[-4000:]}"


@pytest.fixture
def provider():
    from moemesh.cluster.local.provider import LocalNodeProvider

    provider = LocalNodeProvider({"type": "external"}, f"mmu-{secrets.token_hex(3)}")
    yield provider
    provider.cluster.kill()
    shutil.rmtree(provider.cluster.path, ignore_errors=True)


def test_ray_stop_on_a_node_stops_that_node_only(provider):
    provider.create_node({}, {KIND_TAG: "worker"}, 2)
    one, two = (provider.get_command_runner("", n, {}, "", None, False) for n in ("worker-1", "worker-2"))
    one.run("sleep 300 &")
    two.run("sleep 300 &")
    # Another cluster's node of the same name: only the full (cluster directory, node id) marker is ours.
    decoy = subprocess.Popen(["sleep", "300"], start_new_session=True,
                             env={ENV_CLUSTER: f"{provider.cluster.path}-other", ENV_NODE: "worker-1"})
    try:
        assert len(provider.cluster.node_pids("worker-1")) == 1
        assert "Stopped 1 process" in one.run("ray stop", with_output=True).decode()   # the wrapper, not Ray's
        assert not provider.cluster.node_pids("worker-1")
        assert len(provider.cluster.node_pids("worker-2")) == 1 and decoy.poll() is None
        provider.terminate_node("worker-2")
        assert provider.non_terminated_nodes({}) == ["worker-1"]
        assert not provider.cluster.node_pids("worker-2") and not provider.cluster.node_dir("worker-2").exists()
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_node_commands_get_the_clusters_token_and_a_pin_not_the_callers_ray_variables(provider, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-callers-token")
    provider.create_node({}, {KIND_TAG: "worker"}, 1)
    runner = provider.get_command_runner("", "worker-1", {}, "", None, False)
    out = runner.run('echo "$RAY_AUTH_TOKEN|$RAY_AUTH_MODE|$RAY_AUTH_TOKEN_PATH|$RAY_OVERRIDE_RESOURCES|$PWD"',
                     environment_variables={"RAY_OVERRIDE_RESOURCES": {"CPU": 1, "expert_node": 100}},
                     with_output=True).decode().strip().split("|")
    assert out[:3] == ["", "token", str(provider.cluster.token_path)]
    assert json.loads(out[3]) == {"CPU": 1, "expert_node": 100, "moemesh.io/node:worker-1": 1}
    assert out[4] == str(provider.cluster.node_home("worker-1"))
    assert "ray, version" in runner.run("ray --version", with_output=True).decode()   # the wrapper passes it on


@pytest.fixture
def config(tmp_path):
    """A copy of deploy/clusters/local.yaml with its own cluster name and ports; stopped whatever happens."""
    data = yaml.safe_load((REPO / "deploy/clusters/local.yaml").read_text())
    data["cluster_name"] = f"mmt-{secrets.token_hex(3)}"
    data["idle_timeout_minutes"] = 0.25
    ports = {"port": _free_port(), "dashboard-port": _free_port(), "ray-client-server-port": _free_port()}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for flag, port in ports.items():
            data[key] = [re.sub(rf"--{flag}=\d+", f"--{flag}={port}", c) for c in data[key]]
        data[key] = [re.sub(r"\$RAY_HEAD_IP:\d+", f"$RAY_HEAD_IP:{ports['port']}", c) for c in data[key]]
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(data))
    cluster = LocalCluster(cluster_dir(data["cluster_name"], data["provider"]))
    yield path, cluster
    cluster.kill()
    shutil.rmtree(cluster.path, ignore_errors=True)
    for cache in Path("/tmp").glob("ray-config-*"):      # the launcher's config cache of this throwaway cluster
        if data["cluster_name"] in cache.read_text(errors="ignore"):
            cache.unlink(missing_ok=True)


@pytest.fixture
def bystander(tmp_path):
    """Another Ray cluster on this machine (head only, no dashboard): its GCS and raylet pids."""
    temp = Path(f"/tmp/mmby-{secrets.token_hex(3)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    start = subprocess.Popen(RAY + ["start", "--head", f"--port={_free_port()}", "--include-dashboard=false",
                                    f"--ray-client-server-port={_free_port()}", "--dashboard-agent-listen-port=0",
                                    "--num-cpus=0", "--object-store-memory=80000000", f"--temp-dir={temp}",
                                    "--disable-usage-stats"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        assert start.wait(timeout=120) == 0, "the bystander cluster did not start"
        core = [pid for pid in _session_pids(start.pid)
                if re.search(rb"/(gcs_server|raylet) ", Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))]
        assert len(core) == 2, core
        yield core
    finally:
        _stop_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_up_autoscales_and_ray_down_stops_only_this_cluster(config, bystander, tmp_path):
    path, cluster = config
    # The launching shell's Ray variables must not leak into the nodes (a wrong token or address would break them).
    env = os.environ | {"RAY_ADDRESS": "127.0.0.1:1", "RAY_AUTH_TOKEN": "not-this-clusters-token"}
    t0 = time.time()
    _ray(["up", "-y", "--no-config-cache", str(path)], tmp_path / "up.log", env, timeout=180)
    sessions = {s for node in cluster.nodes().values() for s in node["sessions"]}
    assert [n["tags"][KIND_TAG] for n in cluster.nodes().values()] == ["head"]

    client = subprocess.run([sys.executable, "-c", CLIENT], env=cluster.client_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr[-4000:]
    seen = json.loads(next(ln for ln in client.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert seen["node_id"] not in seen["before"], "the actor ran on a node that existed before: no scale-up"
    assert seen["resources"]["NPU"] == 2 and seen["resources"]["expert_node"] == 100
    pins = [r for r in seen["resources"] if r.startswith("moemesh.io/node:")]
    assert len(pins) == 1 and re.fullmatch(r"moemesh.io/node:worker-\d+", pins[0]), pins
    assert seen["labels"]["moemesh.io/supernode"] == "s0"
    assert seen["removed"], f"the idle worker node was not removed within {seen['down_s']:.0f} s"

    deadline = time.time() + 60       # ... and the provider terminated it: no worker entry, no worker process
    while any(n["tags"][KIND_TAG] == "worker" for n in cluster.nodes().values()) and time.time() < deadline:
        time.sleep(0.2)
    assert [n["tags"][KIND_TAG] for n in cluster.nodes().values()] == ["head"]
    sessions |= {s for node in cluster.nodes().values() for s in node["sessions"]}

    _ray(["down", "-y", str(path)], tmp_path / "down.log", env, timeout=120)
    assert not _cluster_processes(cluster.path, sessions), _cluster_processes(cluster.path, sessions)
    assert not cluster.path.exists()
    assert all(_alive(pid) for pid in bystander), "ray down stopped another cluster's processes"
    print(f"up + scale-up {seen['up_s']:.0f} s + scale-down {seen['down_s']:.0f} s + down: {time.time() - t0:.0f} s")


def _scrape(address: str) -> dict[str, list[tuple[dict, float]]]:
    """name -> [(labels, value)] of one Prometheus endpoint."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"http://{address}/metrics", timeout=10).text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.mark.timeout(900)
def test_moemesh_on_ray_up_grows_replicas_onto_a_new_node_and_gives_both_back(config, tmp_path, tiny_model_dir,
                                                                              http_load, wait_until):
    """The acceptance run: `ray up`, `moemesh serve` the tiny model with expert autoscaling, a skewed HTTP load makes
    a few experts hot; their replica actors ask for `expert_node`, which only an autoscaled node type has, so Ray's
    autoscaler launches one; every request succeeds with the reference's text; once the load stops the replicas
    drain and stop and the idle node is removed; `ray down` leaves no process."""
    import httpx
    import torch
    from tokenizers import Tokenizer

    import moemesh

    path, cluster = config
    _ray(["up", "-y", "--no-config-cache", str(path)], tmp_path / "up.log", os.environ, timeout=180)
    sessions = {s for node in cluster.nodes().values() for s in node["sessions"]}
    env = cluster.client_env()
    port = _free_port()
    on_head = {"resources": {"head_node": 1}}
    deployment = {
        "model": str(tiny_model_dir),
        "attention": {"replicas": 2, "max_num_seqs": 8, "kv_cache_blocks": 1024,
                      "placement": {"num_cpus": 0.25, **on_head}},
        "experts": {"shards": 2, "placement": {"num_cpus": 0.25, **on_head},
                    "autoscaling": {"interval_s": 2, "window_s": 4, "target_tokens_per_replica_s": 2.0,
                                    "max_replicas": 2, "max_total_replicas": 2, "experts_per_actor": 2,
                                    "upscale_cooldown_s": 0, "downscale_cooldown_s": 5,
                                    "placement": {"num_cpus": 0.25, "resources": {"expert_node": 1}}}},
        "engram": {"shards": 1, "placement": {"num_cpus": 0.25, **on_head}},
        "ingress": {"port": port, "model_name": "tiny", "limits": {"max_worker_load": 1000}},
    }
    (tmp_path / "moemesh.yaml").write_text(yaml.safe_dump(deployment))
    serve = subprocess.run([sys.executable, "-m", "moemesh.cluster.cli", "serve", str(tmp_path / "moemesh.yaml"),
                            "--address", env["RAY_ADDRESS"], "--detach"], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=400)
    assert serve.returncode == 0, (serve.stdout + serve.stderr)[-4000:]
    url = f"http://127.0.0.1:{port}/v1"
    workers = lambda: [n for n in cluster.nodes().values() if n["tags"][KIND_TAG] == "worker"]  # noqa: E731
    assert not workers()

    reference = moemesh.load_model(tiny_model_dir)
    decode = Tokenizer.from_file(f"{tiny_model_dir}/tokenizer.json").decode
    g = torch.Generator().manual_seed(21)
    hot = torch.randint(3, 40, (6,), generator=g).tolist()          # a few tokens, repeated: a few hot experts
    prompts = [hot * k for k in (1, 2, 3)]
    want = [decode(reference.generate(torch.tensor([p]), max_new_tokens=8, eos_token_id=None)[0, len(p):].tolist(),
                   skip_special_tokens=True) for p in prompts]
    targets = {t["labels"]["deployment"]: t["targets"][0] for t in httpx.get(f"{url.removesuffix('/v1')}/metrics/"
                                                                               "targets", timeout=30).json()}
    controller = targets["expert-controller"]

    def gauge(name: str) -> float:
        return sum(v for _, v in _scrape(controller).get(name, []))

    load = http_load(url, prompts, 6, 8).start()
    try:
        wait_until("a replica actor serving", lambda: gauge("moemesh:replica_actors") >= 1, timeout_s=300)
        assert workers(), "the replica actor runs, but no worker node was launched for it"
        hot_experts = [labels for labels, v in _scrape(controller)["moemesh:expert_replicas"] if v > 1]
        assert hot_experts and gauge("moemesh:autoscaler_decisions_total") >= 1
        done = len(load.results)  # the gauge is exported after the map naming the replicas was installed
        wait_until("some requests with the replicas in the map",
                   lambda: len(load.results) >= done + 2 * load.concurrency, timeout_s=120)
    finally:
        load.stop()
    failed = [r for r in load.results if r[1] != 200]
    assert load.results and not failed, failed[:3]
    wrong = [(p, text, want[p]) for p, _, text in load.results if text != want[p]]
    assert not wrong, wrong[:3]

    wait_until("replicas gone after the load", lambda: gauge("moemesh:replica_actors") == 0, timeout_s=120)
    wait_until("the idle worker node removed", lambda: not workers(), timeout_s=180, every_s=0.5)
    sessions |= {s for node in cluster.nodes().values() for s in node["sessions"]}
    _ray(["down", "-y", str(path)], tmp_path / "down.log", os.environ, timeout=180)
    assert not _cluster_processes(cluster.path, sessions), _cluster_processes(cluster.path, sessions)
    print(f"{len(load.results)} requests, hot experts {hot_experts}")
