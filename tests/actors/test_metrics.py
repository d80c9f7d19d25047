"""Metrics: every role's metric exists under its vLLM-style name, registries are per instance, and the three ways
to expose them (text, ASGI app, HTTP thread) serve the same exposition."""

from __future__ import annotations

import httpx
import pytest

from moemesh.actors.metrics import Metrics, process_metrics

NAMES = {  # name -> Prometheus type
    "moemesh:time_to_first_token_seconds": "histogram", "moemesh:time_per_output_token_seconds": "histogram",
    "moemesh:e2e_request_latency_seconds": "histogram", "moemesh:request_success_total": "counter",
    "moemesh:request_errors_total": "counter", "moemesh:prompt_tokens_total": "counter",
    "moemesh:generation_tokens_total": "counter", "moemesh:ingress_requests_in_progress": "gauge",
    "moemesh:num_requests_running": "gauge", "moemesh:num_requests_waiting": "gauge",
    "moemesh:kv_cache_usage_perc": "gauge", "moemesh:num_preemptions_total": "counter",
    "moemesh:expert_tokens_total": "counter", "moemesh:dispatch_bytes_total": "counter",
    "moemesh:dispatch_messages_total": "counter", "moemesh:engram_lookup_seconds": "histogram",
    "moemesh:engram_cache_queries_total": "counter", "moemesh:engram_cache_hits_total": "counter",
}


def test_every_metric_is_exposed_with_its_type():
    text = Metrics(process_collectors=False).exposition()[0].decode()
    for name, kind in NAMES.items():
        assert f"# TYPE {name.removesuffix('_total')} {kind}" in text or f"# TYPE {name} {kind}" in text, name


def test_registries_are_independent_and_the_process_one_is_shared():
    a, b = Metrics(process_collectors=False), Metrics()
    a.expert_tokens.labels(layer="3", expert="17").inc(5)
    assert 'moemesh:expert_tokens_total{expert="17",layer="3"} 5.0' in a.exposition()[0].decode()
    assert "expert=" not in b.exposition()[0].decode() and "process_resident_memory_bytes" in b.exposition()[0].decode()
    assert process_metrics() is process_metrics()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asgi_app(anyio_backend):
    m = Metrics(process_collectors=False)
    m.engram_cache_hits.inc(3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(m.asgi_app()), base_url="http://m") as c:
        r = await c.get("/")
    assert r.status_code == 200 and "moemesh:engram_cache_hits_total 3.0" in r.text


def test_serve_http():
    m = Metrics(process_collectors=False)
    m.dispatch_bytes.labels(shard="s0", direction="out").inc(1024)
    server, thread = m.serve_http(0, addr="127.0.0.1")
    try:
        r = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5)
        assert 'moemesh:dispatch_bytes_total{direction="out",shard="s0"} 1024.0' in r.text
    finally:
        server.shutdown()
        thread.join(timeout=5)
