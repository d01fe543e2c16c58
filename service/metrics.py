"""Prometheus metrics with vLLM's names, in a registry owned by the app (no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY, registry=r
        ).labels(model)
        self.itl = Histogram(
            "inter_token_latency_seconds", "Time between streamed tokens", labels, buckets=_ITL, registry=r
        ).labels(model)
        self.queue_time = Histogram(
            "request_queue_time_seconds", "Time waiting for a cache slot", labels, buckets=_LATENCY, registry=r
        ).labels(model)
        self.e2e = Histogram(
            "e2e_request_latency_seconds",
            "Request latency, arrival to last token",
            labels,
            buckets=_LATENCY,
            registry=r,
        ).labels(model)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed", labels, registry=r).labels(model)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated", labels, registry=r).labels(model)
        self._finished = Counter(
            "request_success", "Finished requests by finish reason", [*labels, "finished_reason"], registry=r
        )
        self.model = model
        self.running = Gauge("num_requests_running", "Sequences in the running batch", labels, registry=r).labels(model)
        self.waiting = Gauge("num_requests_waiting", "Sequences waiting for a slot", labels, registry=r).labels(model)
        self.kv_usage = Gauge(
            "kv_cache_usage_perc", "Fraction of KV cache positions in use (0-1)", labels, registry=r
        ).labels(model)
        self.shared = Gauge(
            "prefix_cache_shared_positions",
            "Cache positions read from another slot's row (a shared prompt prefix held once), not held twice",
            labels,
            registry=r,
        ).labels(model)

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model, reason).inc()

    def watch(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_usage: Callable[[], float],
        prefix_cache: Callable[[], tuple[int, int]],
        shared: Callable[[], float],
    ) -> None:
        """Gauges and the prefix-cache counters read the scheduler at scrape time."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_usage.set_function(kv_usage)
        self.shared.set_function(shared)
        self.registry.register(_PrefixCacheCounters(self.model, prefix_cache))


class _PrefixCacheCounters(Collector):
    """vLLM's prefix_cache_queries_total / prefix_cache_hits_total, in prompt tokens, counted by the engine loop."""

    def __init__(self, model: str, read: Callable[[], tuple[int, int]]) -> None:
        self.model, self.read = model, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        queries, hits = self.read()
        for name, doc, value in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", hits),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model], value)
            yield family
