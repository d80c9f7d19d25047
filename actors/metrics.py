"""Prometheus metrics of every moemesh role, defined once and registered in one registry per process.

Names follow vLLM's (`vllm:` -> `moemesh:`) where the meaning is the same; the rest are ours. prometheus-client
appends `_total` to counters, so the counter `moemesh:request_success` is exposed as `moemesh:request_success_total`.
Each role updates the metrics it owns and leaves the others at zero: the ingress the request metrics (TTFT,
TPOT, end-to-end latency, successes by finish reason, errors, prompt and generation tokens, requests in progress);
attention workers the scheduler, KV-cache, dispatch (bytes and messages per expert shard) and Engram metrics; expert
shards the tokens per (layer, expert). docs/api.md lists them all.

A process builds its `Metrics` once (`process_metrics()`); tests build their own over a fresh `CollectorRegistry`.
Roles without an HTTP server expose theirs with `Metrics.serve_http(port)`; the ingress serves `exposition()` at
`/metrics`.
"""

from __future__ import annotations

import functools

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               make_asgi_app, start_http_server)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MODEL = ["model_name"]


class Metrics:
    """Every moemesh metric, registered in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True):
        self.registry = r = registry or CollectorRegistry()
        if process_collectors:  # RSS, CPU, open fds, GC: what a soak test watches
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        # Step 1: requests, recorded by the ingress (per choice where a request has several).
        self.time_to_first_token = Histogram(
            "moemesh:time_to_first_token_seconds", "Arrival at the ingress to the first generated token.", MODEL,
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "moemesh:time_per_output_token_seconds", "Mean time per output token after the first, per choice.",
            MODEL, buckets=TPOT_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "moemesh:e2e_request_latency_seconds", "Arrival at the ingress to the last token.", MODEL,
            buckets=E2E_BUCKETS, registry=r)
        self.request_success = Counter(
            "moemesh:request_success", "Finished choices, by finish reason (abort: client gone or worker gave up).",
            MODEL + ["finished_reason"], registry=r)
        self.request_errors = Counter(
            "moemesh:request_errors", "Requests answered with an error, by HTTP status (200: failed mid-stream) and "
            "error code.", MODEL + ["status", "code"], registry=r)
        self.prompt_tokens = Counter("moemesh:prompt_tokens", "Prompt tokens (usage.prompt_tokens).", MODEL,
                                     registry=r)
        self.generation_tokens = Counter("moemesh:generation_tokens", "Generated tokens (usage.completion_tokens).",
                                         MODEL, registry=r)
        self.ingress_requests_in_progress = Gauge(
            "moemesh:ingress_requests_in_progress", "Requests the ingress is generating for (all workers).", MODEL,
            registry=r)
        # Step 2: scheduling and memory, recorded by each attention worker.
        self.num_requests_running = Gauge("moemesh:num_requests_running", "Requests in the running batch.", MODEL,
                                          registry=r)
        self.num_requests_waiting = Gauge("moemesh:num_requests_waiting", "Requests waiting for admission.", MODEL,
                                          registry=r)
        self.kv_cache_usage = Gauge("moemesh:kv_cache_usage_perc", "KV-cache blocks in use, 0 to 1.", MODEL,
                                    registry=r)
        self.num_preemptions = Counter("moemesh:num_preemptions", "Requests preempted (recomputed later).", MODEL,
                                       registry=r)
        # Step 3: experts and links.
        self.expert_tokens = Counter("moemesh:expert_tokens", "Tokens routed to each expert.", ["layer", "expert"],
                                     registry=r)
        self.dispatch_bytes = Counter("moemesh:dispatch_bytes", "Bytes sent to / received from each expert shard.",
                                      ["shard", "direction"], registry=r)
        self.dispatch_messages = Counter("moemesh:dispatch_messages", "Messages sent to each expert shard.",
                                         ["shard"], registry=r)
        # Step 4: Engram memory.
        self.engram_lookup_latency = Histogram("moemesh:engram_lookup_seconds", "One step's Engram row lookup.",
                                               buckets=LOOKUP_BUCKETS, registry=r)
        self.engram_cache_queries = Counter("moemesh:engram_cache_queries", "Engram rows asked of the hot cache.",
                                            registry=r)
        self.engram_cache_hits = Counter("moemesh:engram_cache_hits", "Engram rows found in the hot cache "
                                         "(hit rate = rate(hits) / rate(queries)).", registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format, for an HTTP handler."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def asgi_app(self):
        """An ASGI app answering with this registry's exposition (mount it on any ASGI server)."""
        return make_asgi_app(registry=self.registry)

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on `port` from a daemon thread (for roles without an HTTP server); returns
        prometheus-client's (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)


@functools.cache
def process_metrics() -> Metrics:
    """This process's metrics (built on first use)."""
    return Metrics()
