"""The pure parts of `moemesh bench serve`: the step breakdown from worker counters, the ratios, the JSON and the
markdown (the measurement itself needs a cluster and runs as `moemesh bench serve`)."""

import json

import pytest

from moemesh.cluster.bench.serve_report import LoadResult, Run, as_json, markdown, ratios, step_breakdown


def _load(c, tokens, wall=2.0):
    return LoadResult(c, 2 * c, tokens, wall, [0.1] * (2 * c), [0.02, 0.03])


def test_step_breakdown_is_the_mean_per_step_between_two_snapshots():
    before = {"steps": 10, "micro_batches": 10, "total": 1.0, "compute": 0.5, "wait_experts": 0.4,
              "wait_engram": 0.1, "scheduling": 0.05}
    after = {"steps": 30, "micro_batches": 50, "total": 3.0, "compute": 1.3, "wait_experts": 1.4,
             "wait_engram": 0.3, "scheduling": 0.25}
    got = step_breakdown(before, after, shard_compute_s=0.4)
    assert got == pytest.approx({"step_ms": 100.0, "compute_ms": 40.0, "wait_experts_ms": 50.0,
                                 "wait_engram_ms": 10.0, "scheduling_ms": 10.0, "expert_compute_ms": 20.0,
                                 "micro_batches_mean": 2.0})
    assert step_breakdown(after, after) == {}  # no step ran


def test_json_has_every_field_the_issue_names_and_the_ratios_compare_in_one_run():
    runs = [Run("monolithic", "tiny", None, _load(8, 400), {"step_ms": 10.0, "compute_ms": 9.0,
                                                             "scheduling_ms": 1.0}),
            Run("served", "tiny", 1, _load(8, 200), {"step_ms": 20.0}),
            Run("served", "tiny", 2, _load(8, 300), {"step_ms": 15.0})]
    engram = {"step_ms_local": 10.0, "step_ms_service": 10.2, "wait_ms_service": 0.1, "step_ms_service_no_cache": 11}
    shards = [{"name": "expert-shard-0", "expert_bytes": 2**20, "rss_bytes": 3 * 2**20, "empty_rss_bytes": 2**21}]
    doc = json.loads(as_json(runs, engram, shards, "m", "moemesh bench serve", "load"))
    assert set(doc) == {"machine", "command", "load", "runs", "engram", "shards"}
    for r in doc["runs"]:
        assert {"path", "model", "micro_batches", "concurrency", "decode_tok_s", "ttft_p50_s", "tpot_p50_ms",
                "breakdown"} <= set(r)
    assert [r["decode_tok_s"] for r in doc["runs"]] == [200.0, 100.0, 150.0]
    assert doc["runs"][0]["micro_batches"] is None and doc["runs"][2]["micro_batches"] == 2
    assert ratios(runs) == ["c=8, 1 micro-batch(es): served 0.50x monolithic",
                            "c=8, 2 micro-batch(es): served 0.75x monolithic", "c=8: 2 micro-batches 1.50x 1 micro-batch"]
    text = markdown(runs, engram, shards, "m", "moemesh bench serve", "load")
    assert text.startswith("## Serving tiny (`moemesh bench serve`)\n") and "| expert-shard-0 | 1.0 | 3.0 | 2.0 | 0.92 |" in text
    assert "waiting for rows 0.10 ms (1.0%)" in text
