"""The expert controller live on the 3-node cluster (docs/autoscaling.md): under steady concurrent HTTP load, hot
experts get replicas (autoscale), the replicas move when the load moves (rebalance), and they go away when the budget
is withdrawn; every change starts replica actors first, switches the map in both attention workers, drains, then
stops actors. No request may fail and every answer must equal the single-process reference.

A separate application (`scale`) runs beside the session's `moemesh` app. Its controller ticks only when the test
calls `tick` (interval 1 h), so each phase is deterministic.
"""

from __future__ import annotations

import time

import httpx
import pytest

CONCURRENCY = 8
MAX_TOKENS = 8
WINDOW_S = 3.0
SCALE_CONFIG = {
    "attention": {"replicas": 2, "max_num_seqs": 8, "kv_cache_blocks": 1024, "block_size": 16,
                  "placement": {"num_cpus": 0.5, "resources": {"head_node": 1}}},
    "experts": {"shards": 2, "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}},
                "autoscaling": {"mode": "autoscale", "interval_s": 3600, "window_s": WINDOW_S,
                                "target_tokens_per_replica_s": 1.0, "max_replicas": 3, "max_total_replicas": 4,
                                "experts_per_actor": 2, "upscale_cooldown_s": 0, "downscale_cooldown_s": 0,
                                "rebalance_min_gain": 0.0,
                                "placement": {"num_cpus": 0.25, "resources": {"expert_node": 1}}}},
    "engram": {"shards": 1, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny", "limits": {"max_worker_load": 1000}},
}


@pytest.fixture(scope="module")
def scale_app(side_app):
    with side_app("scale", SCALE_CONFIG) as url:
        yield url


def _handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="scale")


def _call(deployment: str, method: str, *args):
    return getattr(_handle(deployment), method).remote(*args).result(timeout_s=300)


def _workers_on(version: int, replicas: dict) -> bool:
    states = [_call(f"attention-worker-{k}", "expert_map_state") for k in range(2)]
    return all(s["version"] == version and set(s["shards"]) == set(replicas) for s in states)


def _alive_replica_actors(names) -> int:
    """How many of the replica actors `names` are alive (named actors; a stopped one can no longer be looked up)."""
    import ray

    from moemesh.cluster.names import REPLICA_NAMESPACE, replica_actor_name

    alive = 0
    for name in names:
        try:
            handle = ray.get_actor(replica_actor_name("scale", name), namespace=REPLICA_NAMESPACE)
            ray.get(handle.grpc_address.remote(), timeout=30)
            alive += 1
        except (ValueError, ray.exceptions.RayActorError):
            pass
    return alive


def _phase(ctl_changes: dict | None = None) -> tuple[list[dict], dict]:
    """Apply policy changes, let the rate window fill with the current load, tick twice -> (decisions, state)."""
    if ctl_changes:
        _call("expert-controller", "configure", ctl_changes)
    decisions = []
    for _ in range(2):
        # time under test: the controller measures tokens/s over real time; each tick must see a full rate window
        # (window_s) of the current load, so that its older samples leave the window
        time.sleep(WINDOW_S + 0.5)
        decisions += _call("expert-controller", "tick")
    return decisions, _call("expert-controller", "state")


@pytest.mark.timeout(1200)
def test_replicas_follow_the_load_with_no_failed_request(scale_app, reference, wait_until, http_load):
    half = reference.vocab_size // 2
    load_a, load_b = reference.prompts(11, high=half), reference.prompts(12, low=half)  # other tokens, other experts
    wait_until("the scale app to answer", lambda: httpx.post(f"{scale_app}/completions", timeout=120, json={
        "model": "tiny", "prompt": load_a[0], "max_tokens": 2}).status_code == 200)
    loads = []
    try:
        # Phase 1, autoscale: every loaded expert is far above 1 tok/s per holder; the budget (4 extra replicas)
        # goes to the experts with the most load per holder.
        loads.append(http_load(scale_app, load_a, CONCURRENCY, MAX_TOKENS).start())
        wait_until("warm-up answers", lambda: len(loads[0].results) >= CONCURRENCY, timeout_s=300)
        grown, state = _phase()
        assert grown and {d["action"] for d in grown} == {"add"}, state
        hot_a = {k for k, n in state["holders"].items() if n > 1}
        assert sum(n - 1 for n in state["holders"].values()) == 4 and state["replicas"]
        assert _workers_on(state["version"], state["replicas"])          # both workers switched to the new map
        names = set(state["replicas"])
        started = set(names)
        assert _alive_replica_actors(names) == len(names)
        wait_until("tokens sent to the replicas", lambda: all(
            names & set(_call(f"attention-worker-{k}", "stats")["messages_to"]) for k in range(2)), timeout_s=60)
        _status_matches(state)

        # Phase 1b: the same steady load for two more ticks with the cap binding: the set in force stays (at most one
        # swap, where two experts' measured rates cross by more than the hysteresis); before, the map changed on
        # most ticks at the cap.
        steady, again = _phase({"hysteresis": 0.5})
        assert again["version"] <= state["version"] + 1 and len(steady) <= 2, steady
        _effects_measured(again)
        state = again
        names = set(state["replicas"])
        started |= names

        # Phase 2, rebalance: the load moves to other tokens; the same budget follows it (new actors started,
        # emptied ones drained and stopped), still under load.
        loads[0].stop()
        loads.append(http_load(scale_app, load_b, CONCURRENCY, MAX_TOKENS).start())
        moved, state = _phase({"mode": "rebalance"})
        assert moved and {d["action"] for d in moved} == {"rebalance"}, moved
        hot_b = {k for k, n in state["holders"].items() if n > 1}
        assert hot_b != hot_a and sum(n - 1 for n in state["holders"].values()) == 4
        assert _workers_on(state["version"], state["replicas"])
        assert _alive_replica_actors(state["replicas"]) == len(state["replicas"])
        assert _alive_replica_actors(started - set(state["replicas"])) == 0  # emptied by the move: stopped
        started |= set(state["replicas"])

        # Phase 3: the budget is withdrawn under load: every replica drains and stops; the base shards carry on.
        shrunk, state = _phase({"mode": "autoscale", "max_total_replicas": 0})
        assert shrunk and {d["action"] for d in shrunk} == {"remove"}
        assert state["replicas"] == {} and state["holders"] == {}
        assert _workers_on(state["version"], {})
        wait_until("replica actors gone", lambda: _alive_replica_actors(started) == 0, timeout_s=60)
        loads[1].stop()
    finally:
        for load in loads:
            load.stop()

    for load, prompts in zip(loads, (load_a, load_b)):
        load.check(reference.texts(prompts, MAX_TOKENS))
    decisions = _call("expert-controller", "state")["decisions"]
    print(f"requests: {sum(len(x.results) for x in loads)} answered; decisions: {len(decisions)}; "
          f"hot before {sorted(hot_a)} after {sorted(hot_b)}")


def _status_matches(state: dict) -> None:
    """`moemesh status --app scale --json` (a separate process, as an operator runs it) shows the controller's map,
    its replica actors on the node type they ask for, and the decisions with their causes."""
    import json
    import subprocess
    import sys

    import ray

    done = subprocess.run([sys.executable, "-m", "moemesh.cluster.cli", "status", "--app", "scale", "--json",
                           "--address", ray.get_runtime_context().gcs_address], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout)
    assert status["controller"]["map_version"] == state["version"]
    assert {a["name"] for a in status["replica_actors"]} == set(state["replicas"])
    assert all(a["nodes"] == ["expert"] for a in status["replica_actors"]), status["replica_actors"]
    assert status["controller"]["decisions"] and all(d["cause"] in ("rate", "cap") and d["reason"]
                                                     for d in status["controller"]["decisions"])
    assert "expert-controller" in status["deployments"]


def _effects_measured(state: dict) -> None:
    """Does it help? A window after phase 1's adds, the controller has each added expert's tokens/s per holder and
    dispatch latency before and after (the values depend on this machine, not asserted), and `moemesh status` shows
    them."""
    import subprocess
    import sys

    import ray

    settled = [e for e in state["effects"] if e["action"] == "add" and e["tokens_per_holder_after"] is not None]
    assert settled, state["effects"]
    for e in settled:
        assert e["holders_after"] > e["holders_before"] and e["tokens_per_holder_before"] > 0
        assert e["latency_before_s"] > 0 and e["latency_after_s"] > 0  # both windows had dispatches to measure
        print(f"layer {e['layer']} expert {e['expert']} {e['holders_before']} -> {e['holders_after']} holders: "
              f"{e['tokens_per_holder_before']:.1f} -> {e['tokens_per_holder_after']:.1f} tok/s per holder, "
              f"{1e3 * e['latency_before_s']:.1f} -> {1e3 * e['latency_after_s']:.1f} ms")
    done = subprocess.run([sys.executable, "-m", "moemesh.cluster.cli", "status", "--app", "scale", "--address",
                           ray.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    e = settled[-1]
    assert (f"layer {e['layer']} expert {e['expert']} add {e['holders_before']} -> {e['holders_after']}: "
            f"{e['tokens_per_holder_before']:.1f} -> {e['tokens_per_holder_after']:.1f} tok/s per holder") \
        in done.stdout, done.stdout
