"""Prometheus metrics of the ingress: the request metrics, in one registry per process.

Names follow vLLM's (`vllm:` -> `moemesh:`) where the meaning is the same. prometheus-client appends `_total` to
counters, so the counter `moemesh:request_success` is exposed as `moemesh:request_success_total`. The other roles
(attention workers, expert and Engram shards) have no HTTP app: `actors/role_metrics.py` exposes their counters, each on
a port of its own. docs/api.md lists them all.

A process builds its `Metrics` once (`process_metrics()`); tests build their own over a fresh `CollectorRegistry`.
The ingress serves `exposition()` at `/metrics`.
"""

from __future__ import annotations

import functools

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
MODEL = ["model_name"]


class Metrics:
    """The ingress's request metrics, registered in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True):
        self.registry = r = registry or CollectorRegistry()
        if process_collectors:  # RSS, CPU, open fds, GC: what a soak test watches
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        # Recorded per choice where a request has several.
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

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format, for an HTTP handler."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@functools.cache
def process_metrics() -> Metrics:
    """This process's metrics (built on first use)."""
    return Metrics()
