"""Metrics: the ingress's request metrics and the other roles' collectors exist under their vLLM-style names with the
values they were given, registries are per instance, and a role's registry is served over HTTP."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import httpx

from moemesh.actors.attention.blocks import KVCacheUsage
from moemesh.actors.attention.engine import EngineStats, StepClock
from moemesh.actors.attention.remote_step import StepParts
from moemesh.actors.attention.token_dispatch import DispatchStats
from moemesh.actors.ingress.metrics import Metrics, process_metrics
from moemesh.actors.role_metrics import WorkerCollector, role_registry, serve_registry

INGRESS = {  # name -> Prometheus type
    "moemesh:time_to_first_token_seconds": "histogram", "moemesh:time_per_output_token_seconds": "histogram",
    "moemesh:e2e_request_latency_seconds": "histogram", "moemesh:request_success_total": "counter",
    "moemesh:request_errors_total": "counter", "moemesh:prompt_tokens_total": "counter",
    "moemesh:generation_tokens_total": "counter", "moemesh:ingress_requests_in_progress": "gauge",
}


def _has_type(text: str, name: str, kind: str) -> bool:
    return f"# TYPE {name.removesuffix('_total')} {kind}" in text or f"# TYPE {name} {kind}" in text


def test_every_ingress_metric_is_exposed_with_its_type():
    text = Metrics(process_collectors=False).exposition()[0].decode()
    for name, kind in INGRESS.items():
        assert _has_type(text, name, kind), name
    assert "moemesh:num_requests_running" not in text  # the workers' metrics are theirs (role_metrics), not zeros here


def test_registries_are_independent_and_the_process_one_is_shared():
    a, b = Metrics(process_collectors=False), Metrics()
    a.prompt_tokens.labels("m").inc(5)
    assert 'moemesh:prompt_tokens_total{model_name="m"} 5.0' in a.exposition()[0].decode()
    assert 'model_name="m"' not in b.exposition()[0].decode()
    assert "process_resident_memory_bytes" in b.exposition()[0].decode()
    assert process_metrics() is process_metrics()


def _worker(num_preemptions: int) -> SimpleNamespace:
    stats = EngineStats(num_running=2, num_waiting=3, kv_cache=KVCacheUsage(1, 4, 1, 2, 0.25),
                        num_preemptions=num_preemptions, prefix_cache_queries=640, prefix_cache_hits=512)
    dispatch = DispatchStats(tokens_per_expert=Counter({(3, 17): 5}), bytes_to=Counter({"s0": 1024}),
                             bytes_from=Counter({"s0": 512}), messages_to=Counter({"s0": 2}))
    return SimpleNamespace(engine=SimpleNamespace(engine=SimpleNamespace(stats=lambda: stats, clock=StepClock())),
                           dispatcher=SimpleNamespace(stats=dispatch), engram=None, step_parts=StepParts())


def test_a_worker_registry_exports_its_engine_and_dispatch_counters_over_http():
    registry = role_registry()
    registry.register(WorkerCollector(_worker(num_preemptions=7), "tiny"))
    address = serve_registry(registry, "127.0.0.1")
    text = httpx.get(f"http://{address}/metrics", timeout=5).text
    for line in ('moemesh:num_requests_running{model_name="tiny"} 2.0',
                 'moemesh:num_requests_waiting{model_name="tiny"} 3.0',
                 'moemesh:kv_cache_usage_perc{model_name="tiny"} 0.25',
                 'moemesh:num_preemptions_total{model_name="tiny"} 7.0',
                 'moemesh:prefix_cache_queries_total{model_name="tiny"} 640.0',
                 'moemesh:prefix_cache_hits_total{model_name="tiny"} 512.0',
                 'moemesh:expert_tokens_total{expert="17",layer="3"} 5.0',
                 'moemesh:dispatch_bytes_total{direction="sent",shard="s0"} 1024.0',
                 'moemesh:dispatch_bytes_total{direction="received",shard="s0"} 512.0',
                 'moemesh:dispatch_messages_total{shard="s0"} 2.0'):
        assert line in text, line
    assert _has_type(text, "moemesh:num_preemptions_total", "counter") and "process_resident_memory_bytes" in text
