"""Prometheus metrics of the roles that have no HTTP app: attention workers, expert shards, Engram shards.

Each role keeps plain counters on its hot path; a collector turns them into Prometheus families only when scraped,
so nothing is paid per token. Names follow vLLM's (`vllm:` -> `moemesh:`) where the meaning is the same. Each
process serves its own registry on a port of its own (`serve_registry`); the ingress lists every role's address for
Prometheus' HTTP service discovery at `/metrics/targets`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MODEL = ["model_name"]


def role_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # RSS, CPU, fds: what a soak test watches
    return registry


def serve_registry(registry: CollectorRegistry, host: str) -> str:
    """Serve `registry` over HTTP on a free port from a daemon thread; returns `host:port`."""
    server, _ = start_http_server(0, addr=host, registry=registry)
    return f"{host}:{server.server_port}"


def engram_latency_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("moemesh:engram_lookup_seconds", "One step's Engram row lookup (all layers).",
                     buckets=LOOKUP_BUCKETS, registry=registry)


def _counter(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric([str(k) for k in (key if isinstance(key, tuple) else (key,))], value)
    return family


class WorkerCollector(Collector):
    """An attention worker: scheduler, KV and prefix cache, tokens per expert, bytes/messages per shard, Engram."""

    def __init__(self, worker, model_name: str):
        self.worker, self.model_name = worker, model_name

    def collect(self):
        stats, m = self.worker.engine.engine.stats(), [self.model_name]
        for family, value in ((GaugeMetricFamily("moemesh:num_requests_running", "Requests in the running batch.",
                                                 labels=MODEL), stats.num_running),
                              (GaugeMetricFamily("moemesh:num_requests_waiting", "Requests waiting for admission.",
                                                 labels=MODEL), stats.num_waiting),
                              (GaugeMetricFamily("moemesh:kv_cache_usage_perc", "KV cache in use, 0 to 1.",
                                                 labels=MODEL), stats.kv_cache.fraction)):
            family.add_metric(m, value)
            yield family
        yield _counter("moemesh:num_preemptions", "Requests preempted (recomputed later).", MODEL,
                       {self.model_name: stats.num_preemptions})
        yield _counter("moemesh:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's "
                       "prefix_cache_queries).", MODEL, {self.model_name: stats.prefix_cache_queries})
        yield _counter("moemesh:prefix_cache_hits", "Of those, tokens whose state was found (vLLM's "
                       "prefix_cache_hits).", MODEL, {self.model_name: stats.prefix_cache_hits})
        parts = self.worker.step_parts.seconds(self.worker.engine.engine.clock)
        yield _counter("moemesh:steps", "Forward steps run (each over the whole running batch).", [],
                       {(): parts.pop("steps")})
        parts.pop("micro_batches")
        yield _counter("moemesh:step_seconds", "Seconds of forward steps by part: total; compute (attention, norms, "
                       "mHC, router, shared expert on the step thread); wait_experts (idle until routed experts "
                       "answered); wait_engram (idle at the first Engram layer); scheduling (schedule, sampling, "
                       "postprocess: the engine's step beyond the forward pass).", ["part"], parts)
        d = self.worker.dispatcher.stats
        yield _counter("moemesh:expert_tokens", "Tokens routed to each expert.", ["layer", "expert"],
                       dict(d.tokens_per_expert))
        sent = {(s, "sent"): n for s, n in d.bytes_to.items()}
        received = {(s, "received"): n for s, n in d.bytes_from.items()}
        yield _counter("moemesh:dispatch_bytes", "Bytes sent to / received from each expert shard.",
                       ["shard", "direction"], {**sent, **received})
        yield _counter("moemesh:dispatch_messages", "Messages sent to each expert shard.", ["shard"],
                       dict(d.messages_to))
        yield _counter("moemesh:dispatch_seconds", "Summed round-trip seconds of the messages each expert shard "
                       "answered (divide by moemesh:dispatch_messages for the mean latency).", ["shard"],
                       dict(d.seconds_to))
        if self.worker.engram is not None:
            c = self.worker.engram.counters
            yield _counter("moemesh:engram_cache_queries", "Distinct Engram rows asked of the hot cache.", [],
                           {(): c.cache_hits + c.cache_misses})
            yield _counter("moemesh:engram_cache_hits", "Distinct Engram rows found in the hot cache.", [],
                           {(): c.cache_hits})
            yield _counter("moemesh:engram_failovers", "Engram replica calls that failed and moved on.", [],
                           {(): c.failovers})


class ExpertShardCollector(Collector):
    """An expert shard: tokens per (layer, expert) it computed, requests, merged batches, bytes."""

    def __init__(self, shard):
        self.shard = shard

    def collect(self):
        c = self.shard.counters
        per_expert = {(layer, e): n for layer, seen in c.tokens_per_expert.items() for e, n in seen.items()}
        yield _counter("moemesh:shard_expert_tokens", "Tokens this shard computed, per (layer, expert).",
                       ["layer", "expert"], per_expert)
        yield _counter("moemesh:shard_requests", "Dispatch requests accepted.", [], {(): c.requests})
        yield _counter("moemesh:shard_batches", "Grouped expert computations (requests merged into one).", [],
                       {(): c.batches})
        yield _counter("moemesh:shard_bytes", "Tensor bytes in and out.", ["direction"],
                       {"in": c.bytes_in, "out": c.bytes_out})
        yield _counter("moemesh:shard_rejected", "Requests refused as overloaded.", [], {(): c.rejected})
        yield _counter("moemesh:shard_compute_seconds", "Seconds spent computing expert batches.", [],
                       {(): c.compute_s})


class EngramShardCollector(Collector):
    """An Engram shard: lookups, rows and bytes served."""

    def __init__(self, shard):
        self.shard = shard

    def collect(self):
        c = self.shard.counters
        yield _counter("moemesh:engram_shard_lookups", "Lookup calls served.", [], {(): c.lookups})
        yield _counter("moemesh:engram_shard_rows", "Rows served.", [], {(): c.rows})
        yield _counter("moemesh:engram_shard_bytes", "Row bytes served.", [], {(): c.bytes_out})
