"""Fault tolerance on the 3-node cluster (docs/reliability.md): under a steady load of concurrent requests, kill (by
PID) an expert shard that has a replica, one that has none, an attention worker and an Engram replica, one after
the other; no request may fail and every answer must equal the reference. Recovery times are printed (run with -s).

A second application (`faults`, its own deployments: a replicated expert shard, 2 Engram replicas, no Engram cache
so every step asks the shards) runs beside the session's `moemesh` app, so the kills disturb no other test.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

CONCURRENCY = 32
MAX_TOKENS = 12
EXPERTS_A = [e for e in range(16) if e % 2 == 0]
EXPERTS_B = [e for e in range(16) if e % 2 == 1]
LAYERS = range(4)
FAULT_CONFIG = {
    "attention": {"replicas": 2, "max_num_seqs": 16, "kv_cache_blocks": 1024, "block_size": 16,
                  "engram_cache_rows": 0, "placement": {"num_cpus": 0.5, "resources": {"head_node": 1}}},
    "experts": {"assignment": [{"experts": {layer: EXPERTS_A for layer in LAYERS}},   # shard 0
                               {"experts": {layer: EXPERTS_A for layer in LAYERS}},   # shard 1: replica of shard 0
                               {"experts": {layer: EXPERTS_B for layer in LAYERS}}],  # shard 2: no replica
                "placement": {"num_cpus": 0.5, "resources": {"expert_node": 1}}},
    "engram": {"shards": 1, "replicas": 2, "placement": {"num_cpus": 0.5, "resources": {"engram_node": 1}}},
    "ingress": {"model_name": "tiny", "limits": {"max_worker_load": 1000}},
}


@pytest.fixture(scope="module")
def fault_app(side_app):
    """The `faults` application on the session's cluster and Serve: its API base URL."""
    with side_app("faults", FAULT_CONFIG) as url:
        yield url


def _handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="faults")


def _pid(deployment: str) -> int:
    return _handle(deployment).pid.remote().result(timeout_s=120)


def _worker_faults(kind: str) -> list[dict]:
    out = []
    for k in range(2):
        try:
            out += _handle(f"attention-worker-{k}").stats.remote().result(timeout_s=10)["faults"][kind]
        except Exception:  # noqa: BLE001 - a worker restarting has no stats yet
            pass
    return out


def _kill(deployment: str) -> tuple[int, float]:
    pid = _pid(deployment)
    os.kill(pid, signal.SIGKILL)  # exactly the replica process this test's app started
    return pid, time.time()


def _expert_incident(shard: int, since: float, key: str):
    events = [e for e in _worker_faults("experts") if e["shard"] == str(shard) and e["down_at"] >= since - 1.0
              and e[key] is not None]
    return min(events, key=lambda e: e[key]) if events else None


@pytest.mark.timeout(1200)
def test_no_request_fails_while_shards_and_workers_die(fault_app, reference, wait_until, http_load):
    prompts = reference.prompts(5, (1, 3, 5, 8, 13, 21, 34, 55))
    want = reference.texts(prompts, MAX_TOKENS)
    wait_until("the faults app to answer", lambda: httpx.post(f"{fault_app}/completions", timeout=120, json={
        "model": "tiny", "prompt": prompts[0], "max_tokens": 2}).status_code == 200)

    load = http_load(fault_app, prompts, CONCURRENCY, MAX_TOKENS).start()
    recovery = {}
    try:
        wait_until("warm-up answers", lambda: len(load.results) >= CONCURRENCY, timeout_s=300)

        # 1. an expert shard whose experts have a replica: its tokens go to the replica at once
        old, t0 = _kill("expert-shard-1")
        e = wait_until("re-routing around expert-shard-1", lambda: _expert_incident(1, t0, "recovered_at"))
        recovery["expert shard with a replica (re-routed)"] = e["recovered_at"] - t0
        e = wait_until("expert-shard-1 healthy again", lambda: _expert_incident(1, t0, "healthy_at"))
        recovery["  ... restarted shard healthy again"] = e["healthy_at"] - t0
        assert _pid("expert-shard-1") != old

        # 2. an expert shard nobody else backs: steps wait for Serve's restart, the address is re-resolved
        old, t0 = _kill("expert-shard-2")
        e = wait_until("expert-shard-2 serving again", lambda: _expert_incident(2, t0, "recovered_at"))
        recovery["expert shard without a replica (restart)"] = e["recovered_at"] - t0
        assert e["how"] == "restarted" and _pid("expert-shard-2") != old

        # 3. an attention worker: its requests are re-admitted on the other one
        done_before = len(load.results)
        old, t0 = _kill("attention-worker-0")
        moved = wait_until("re-admitted requests", lambda: [r for r in _handle("ingress").faults.remote().result(
            timeout_s=30) if r["lost_at"] >= t0 - 1.0 and r["resumed_at"] is not None])
        recovery["attention worker (first request resumed)"] = min(r["resumed_at"] for r in moved) - t0
        wait_until("attention-worker-0 back", lambda: _pid("attention-worker-0") != old, timeout_s=300)
        recovery["  ... worker restarted"] = time.time() - t0
        moved = [r for r in _handle("ingress").faults.remote().result(timeout_s=30) if r["lost_at"] >= t0 - 1.0]
        recovery["  ... requests re-admitted"] = len(moved)
        assert len(load.results) > done_before

        # 4. an Engram replica: lookups fail over to the other replica
        old, t0 = _kill("engram-shard-0-1")
        events = wait_until("an Engram failover", lambda: [e for e in _worker_faults("engram") if e["failed_at"] >= t0])
        recovery["Engram replica (failover)"] = min(e["recovered_at"] for e in events) - t0
        wait_until("engram-shard-0-1 back", lambda: _pid("engram-shard-0-1") != old, timeout_s=300)
        recovery["  ... replica restarted"] = time.time() - t0
        after = len(load.results)
        wait_until("answers after the last kill", lambda: len(load.results) >= after + CONCURRENCY, timeout_s=300)
    finally:
        load.stop()

    print("\nrecovery (s):", json.dumps({k: round(v, 2) for k, v in recovery.items()}, indent=1))
    print(f"requests: {len(load.results)} answered, concurrency {CONCURRENCY}")
    load.check(want)
