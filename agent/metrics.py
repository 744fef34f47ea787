"""Prometheus metrics of the agent, exposed at /metrics by prometheus_client.

Request metrics are recorded by the HTTP middleware; queue, token and
inference figures are counted by the runtime (`ModelUsage`, `SchedulerStats`)
and read from the registry at scrape time by a collector, so the runtime stays
free of any metrics library and every interface is counted alike. Each app has its own
CollectorRegistry so that several agents can live in one test process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.registry import ModelRegistry, ModelState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgefleet_http_requests", "HTTP requests by route and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_http_request_duration_seconds", "Time to the last byte of the response",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "edgefleet_time_to_first_token_seconds", "From admission to the first generated text",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def watch(self, models: ModelRegistry) -> None:
        self.registry.register(_RegistryCollector(models))


class _RegistryCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        loaded = GaugeMetricFamily(
            "edgefleet_models", "Models known to the registry, by state", labels=["state"]
        )
        statuses = self._models.statuses()
        for state in ModelState:
            loaded.add_metric([state.value], sum(1 for s in statuses if s.state is state))
        yield loaded
        depth = GaugeMetricFamily(
            "edgefleet_queue_depth", "Requests admitted and not finished (running + queued)",
            labels=["model"],
        )
        counters = {
            key: CounterMetricFamily(f"edgefleet_scheduler_{key}", help_, labels=["model"])
            for key, help_ in (
                ("admitted", "Requests admitted to a model's queue"),
                ("rejected", "Requests refused because the queue was full"),
                ("completed", "Requests that ran to completion"),
                ("failed", "Requests whose backend call raised"),
                ("cancelled", "Requests stopped because the client went away"),
            )
        }
        busy = CounterMetricFamily(
            "edgefleet_model_busy_seconds", "Time each model spent running requests",
            labels=["model"],
        )
        for served in self._models.serving():
            stats = served.scheduler.stats
            depth.add_metric([served.name], served.scheduler.depth)
            for key, family in counters.items():
                family.add_metric([served.name], getattr(stats, key))
            busy.add_metric([served.name], stats.busy_seconds)
        yield depth
        yield from counters.values()
        yield busy
        prompt = CounterMetricFamily("edgefleet_prompt_tokens", "Prompt tokens processed", labels=["model"])
        cached = CounterMetricFamily(
            "edgefleet_prompt_tokens_cached", "Prompt tokens reused from the prefix cache", labels=["model"]
        )
        generated = CounterMetricFamily("edgefleet_generated_tokens", "Tokens generated", labels=["model"])
        inferences = CounterMetricFamily(
            "edgefleet_inferences", "Embedding inputs and tensor inferences run", labels=["model", "kind"]
        )
        for name, usage in sorted(self._models.usage().items()):
            prompt.add_metric([name], usage.prompt_tokens)
            cached.add_metric([name], usage.cached_prompt_tokens)
            generated.add_metric([name], usage.generated_tokens)
            inferences.add_metric([name, "embedding"], usage.embedded_inputs)
            inferences.add_metric([name, "tensor"], usage.requests.get("infer", 0))
        yield prompt
        yield cached
        yield generated
        yield inferences
