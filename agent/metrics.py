"""Prometheus metrics of the agent, exposed at /metrics by prometheus_client.

Request metrics are recorded by the HTTP middleware and the gRPC servicer, each under
its own names (HTTP's `edgefleet_http_*`, gRPC's `grpc_server_*` as go-grpc-prometheus
names them), so a sum over one never counts the other. Queue, token, latency and
inference figures are counted by the runtime (`ModelUsage`, `SchedulerStats`) and read
from the registry at scrape time by a collector, so the runtime stays free of any metrics
library and every interface is counted alike. System, energy and attribution figures are
read from the runtime's `Sampler`, the same snapshots the MQTT telemetry records are built
from. Each app has its own CollectorRegistry so that several agents can live in one test
process.

Names follow a convention where one exists: OpenTelemetry's GenAI semantic conventions
(`gen_ai.server.*`) converted as OpenTelemetry's Prometheus exporter converts them
(dots to underscores, the unit as a suffix), with the label `model` for
`gen_ai.request.model` as on every other per-model metric. docs/api.md maps each one to
llama-server's and vLLM's names. Every label value comes from a bounded set (a route
template, an HTTP method, a code): never a request's text or an error message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.energy.sampler import Sampler
from runtime.registry import ModelRegistry, ModelState
from security.gate import GateCounters

if TYPE_CHECKING:  # the link (paho) and the telemetry outbox (sqlite3) load only with [mqtt]
    from sync.mqtt import LinkStatus
    from sync.telemetry import TelemetryPublisher

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
        # KServe v2 gRPC calls, under go-grpc-prometheus's names (every gRPC dashboard reads them)
        self.grpc_handled = Counter(
            "grpc_server_handled", "gRPC calls completed, by method and status code",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "grpc_server_handling_seconds", "Time from a gRPC call's start to its answer",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (prometheus_client's own)
        ProcessCollector(registry=self.registry)

    def watch(self, models: ModelRegistry) -> None:
        self.registry.register(_RegistryCollector(models))

    def watch_telemetry(self, sampler: Sampler, publisher: Callable[[], TelemetryPublisher | None],
                        link: Callable[[], LinkStatus | None]) -> None:
        """System, energy, attribution, outbox and MQTT figures: what telemetry sends, at scrape time."""
        self.registry.register(_TelemetryCollector(sampler, publisher, link))


class _RegistryCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily(
            "edgefleet_models", "Models known to the registry, by state", labels=["state"]
        )
        statuses = self._models.statuses()
        for state in ModelState:
            loaded.add_metric([state.value], sum(1 for s in statuses if s.state is state))
        yield loaded
        keep_alive = GaugeMetricFamily("edgefleet_model_keep_alive_seconds",
                                       "Idle time after which a model is unloaded (0: never)", labels=["model"])
        in_memory = GaugeMetricFamily("edgefleet_model_loaded", "1 while the model is in memory, 0 when "
                                  "unloaded for being idle (or loading, failed)", labels=["model", "state"])
        for status in statuses:
            keep_alive.add_metric([status.name], self._models.keep_alive_s.get(status.name, 0.0))
            in_memory.add_metric([status.name, status.state.value], 1 if status.state is ModelState.READY else 0)
        yield keep_alive
        yield in_memory
        depth = GaugeMetricFamily(
            "edgefleet_queue_depth", "Requests admitted and not finished (running + queued)",
            labels=["model"],
        )
        running = GaugeMetricFamily("edgefleet_requests_running", "Requests the model works on now "
                                    "(vllm:num_requests_running, llamacpp:requests_processing)", labels=["model"])
        waiting = GaugeMetricFamily("edgefleet_requests_waiting", "Admitted requests queued for a slot "
                                    "(vllm:num_requests_waiting, llamacpp:requests_deferred)", labels=["model"])
        kv = GaugeMetricFamily("edgefleet_kv_cache_usage_ratio", "KV cache cells in use over n_ctx (prefix "
                               "cache included, as llamacpp:kv_cache_usage_ratio); absent for a model without "
                               "a KV cache", labels=["model"])
        for served in self._models.serving():
            now_running, now_waiting = served.scheduler.occupancy()
            depth.add_metric([served.name], now_running + now_waiting)
            running.add_metric([served.name], now_running)
            waiting.add_metric([served.name], now_waiting)
            cells = served.scheduler.kv_cache_usage()
            if cells is not None:
                kv.add_metric([served.name], cells)
        yield depth
        yield running
        yield waiting
        yield kv
        yield _tuned_info(self._models)
        counters = {
            key: CounterMetricFamily(f"edgefleet_scheduler_{key}", help_, labels=["model"])
            for key, help_ in (
                ("admitted", "Requests admitted to a model's queue"),
                ("rejected", "Requests refused because the queue was full"),
                ("completed", "Requests that ran to completion"),
                ("failed", "Requests whose backend call raised"),
                ("cancelled", "Requests stopped because the client went away"),
                ("executions", "Backend runs (a GGUF decode step is one)"),
                ("executed", "Requests served by those runs; divided by executions: the mean batch size"),
            )
        }
        busy = CounterMetricFamily(
            "edgefleet_model_busy_seconds", "Time each model spent running requests",
            labels=["model"],
        )
        prompt = CounterMetricFamily("edgefleet_prompt_tokens", "Prompt tokens processed", labels=["model"])
        cached = CounterMetricFamily(
            "edgefleet_prompt_tokens_cached", "Prompt tokens reused from the prefix cache", labels=["model"]
        )
        generated = CounterMetricFamily("edgefleet_generated_tokens", "Tokens generated", labels=["model"])
        inferences = CounterMetricFamily(
            "edgefleet_inferences", "Embedding inputs and tensor inferences run", labels=["model", "kind"]
        )
        unloads = CounterMetricFamily("edgefleet_model_idle_unloads", "Unloads after the keep-alive",
                                      labels=["model"])
        reloads = CounterMetricFamily("edgefleet_model_reloads", "Reloads for a request after an idle unload",
                                      labels=["model"])
        ttft = HistogramMetricFamily("gen_ai_server_time_to_first_token_seconds",
                                     "From admission to the first generated text (gen_ai.server.time_to_first_token)",
                                     labels=["model"])
        tpot = HistogramMetricFamily("gen_ai_server_time_per_output_token_seconds",
                                     "Per generation of 2 tokens or more: (end - first text) / (tokens - 1), the "
                                     "mean inter-token latency (gen_ai.server.time_per_output_token)", labels=["model"])
        duration = HistogramMetricFamily("gen_ai_server_request_duration_seconds",
                                         "From admission to the end of every admitted request, whatever its outcome "
                                         "(gen_ai.server.request.duration)", labels=["model", "operation"])
        live_busy = self._models.busy_seconds()
        for name, usage in sorted(self._models.usage().items()):
            for key, family in counters.items():
                family.add_metric([name], getattr(usage.queue, key))
            busy.add_metric([name], live_busy.get(name, usage.queue.busy_seconds))
            prompt.add_metric([name], usage.prompt_tokens)
            cached.add_metric([name], usage.cached_prompt_tokens)
            generated.add_metric([name], usage.generated_tokens)
            inferences.add_metric([name, "embedding"], usage.embedded_inputs)
            inferences.add_metric([name, "tensor"], usage.requests.get("infer", 0))
            unloads.add_metric([name], usage.idle_unloads)
            reloads.add_metric([name], usage.reloads)
            hist = usage.time_to_first_token
            ttft.add_metric([name], hist.cumulative(), hist.sum_s)
            hist = usage.time_per_output_token
            tpot.add_metric([name], hist.cumulative(), hist.sum_s)
            for operation, hist in sorted(usage.request_duration.items()):
                duration.add_metric([name, operation], hist.cumulative(), hist.sum_s)
        yield from counters.values()
        yield busy
        yield prompt
        yield cached
        yield generated
        yield inferences
        yield unloads
        yield reloads
        yield ttft
        yield tpot
        yield duration


class _TelemetryCollector(Collector):
    def __init__(self, sampler: Sampler, publisher: Callable[[], TelemetryPublisher | None],
                 link: Callable[[], LinkStatus | None]) -> None:
        self._sampler = sampler
        self._publisher = publisher
        self._link = link

    def collect(self) -> Iterator[Metric]:
        yield from self._system()
        yield from self._energy()
        publisher = self._publisher()
        if publisher is not None:
            stats = publisher.last_stats
            yield GaugeMetricFamily("edgefleet_telemetry_outbox_records", "Telemetry records waiting for the broker",
                                    value=stats.queued)
            yield CounterMetricFamily("edgefleet_telemetry_outbox_dropped", "Records that fell off the outbox's bound",
                                      value=stats.dropped)
            yield CounterMetricFamily("edgefleet_telemetry_refused", "Records the broker refused",
                                      value=stats.refused)
            yield CounterMetricFamily("edgefleet_telemetry_records_lost", "Records neither stored (the disk "
                                      "refused the outbox) nor sent (the broker was away)",
                                      value=publisher.records_lost)
            yield GaugeMetricFamily("edgefleet_telemetry_storage_failing", "1 while the outbox cannot be written "
                                    "(disk full, read-only): records go straight to the broker or are lost",
                                    value=1 if publisher.storage.error is not None else 0)
        link = self._link()
        if link is not None:
            yield GaugeMetricFamily("edgefleet_mqtt_connected", "1 while connected to the broker",
                                    value=1 if link.connected else 0)
            yield CounterMetricFamily("edgefleet_mqtt_connects", "Successful connections to the broker",
                                      value=link.connects)
            send = link.send
            yield GaugeMetricFamily("edgefleet_mqtt_send_queue_messages", "Messages waiting in memory for the "
                                    "broker (update reports)", value=send.queued)
            yield GaugeMetricFamily("edgefleet_mqtt_send_queue_bytes", "Their bytes (at most "
                                    "mqtt.send_queue_max_bytes)", value=send.queued_bytes)
            yield CounterMetricFamily("edgefleet_mqtt_send_dropped_messages", "Messages dropped from the send "
                                      "queue, oldest first, past its count or byte bound", value=send.dropped)
            yield CounterMetricFamily("edgefleet_mqtt_send_dropped_bytes", "Their bytes", value=send.dropped_bytes)

    def _system(self) -> Iterator[Metric]:
        s = self._sampler.system
        if s is None:
            return
        util = GaugeMetricFamily("edgefleet_system_cpu_utilization_ratio",
                                 "Busy share of the CPUs over the last sample", labels=["cpu"])
        util.add_metric(["all"], s.cpu_utilization)
        for i, value in enumerate(s.cpu_utilization_per_cpu):
            util.add_metric([str(i)], value)
        yield util
        load = GaugeMetricFamily("edgefleet_system_load_average", "Load average", labels=["period"])
        for period, value in (("1m", s.load_1m), ("5m", s.load_5m), ("15m", s.load_15m)):
            load.add_metric([period], value)
        yield load
        memory = GaugeMetricFamily("edgefleet_system_memory_bytes", "Memory", labels=["state"])
        for state, value in (("total", s.memory_total_bytes), ("used", s.memory_used_bytes),
                             ("available", s.memory_available_bytes)):
            memory.add_metric([state], value)
        yield memory
        swap = GaugeMetricFamily("edgefleet_system_swap_bytes", "Swap", labels=["state"])
        swap.add_metric(["total"], s.swap_total_bytes)
        swap.add_metric(["used"], s.swap_used_bytes)
        yield swap
        disk = GaugeMetricFamily("edgefleet_state_dir_disk_bytes", "The state directory's filesystem",
                                 labels=["state"])
        for state, value in (("total", s.disk_total_bytes), ("used", s.disk_used_bytes),
                             ("free", s.disk_free_bytes)):
            disk.add_metric([state], value)
        yield disk
        if s.temperatures_c:
            temp = GaugeMetricFamily("edgefleet_temperature_celsius", "Temperature sensors", labels=["sensor"])
            for label, value in s.temperatures_c.items():
                temp.add_metric([label], value)
            yield temp
        net = CounterMetricFamily("edgefleet_network_bytes", "Network bytes, all interfaces but loopback",
                                  labels=["direction"])
        net.add_metric(["receive"], s.network_rx_bytes)
        net.add_metric(["transmit"], s.network_tx_bytes)
        yield net
        yield GaugeMetricFamily("edgefleet_system_uptime_seconds", "Since the machine booted", value=s.system_uptime_s)
        yield GaugeMetricFamily("edgefleet_process_cpu_utilization_ratio",
                                "The agent's CPU use over the last sample, in CPUs", value=s.process_cpu_utilization)

    def _energy(self) -> Iterator[Metric]:
        e = self._sampler.energy
        if e is None:
            return
        labels = ["domain", "source", "method"]
        energy = CounterMetricFamily("edgefleet_energy_joules", "Energy since the agent started, per domain",
                                     labels=labels)
        power = GaugeMetricFamily("edgefleet_power_watts", "Average power over the last energy sample; absent "
                                  "when unknown (never 0 for a failed read)", labels=labels)
        resets = CounterMetricFamily("edgefleet_energy_counter_resets", "Energy counters that went down "
                                     "without a known range (driver reload)", labels=labels)
        dropped = CounterMetricFamily("edgefleet_energy_samples_dropped", "Energy samples dropped "
                                      "(reset, implausible)", labels=labels)
        for d in e.domains:
            key = [d.domain, d.source, d.method]
            energy.add_metric(key, d.energy_j)
            if d.power_w is not None:
                power.add_metric(key, d.power_w)
            resets.add_metric(key, d.resets)
            dropped.add_metric(key, d.dropped_samples)
        yield energy
        yield power
        yield resets
        yield dropped
        source = GaugeMetricFamily("edgefleet_energy_source_up", "1 when the source is read now; 0 with why as "
                                   "a code in the reason label (absent, permission_denied, external_power, "
                                   "unreadable, error; ok when up): the text is in telemetry and the log",
                                   labels=["source", "method", "used", "reason"])
        for st in e.sources:
            source.add_metric([st.name, st.method, str(st.used).lower(), "ok" if st.available else st.code],
                              1 if st.available else 0)
        yield source
        a = self._sampler.attributed()
        host = CounterMetricFamily("edgefleet_host_energy_joules", "Energy of the domains counted in the "
                                   "total, split into idle baseline and active", labels=["part", "method"])
        host.add_metric(["active", e.method], a.active_j)
        host.add_metric(["idle", e.method], a.idle_j)
        yield host
        active = CounterMetricFamily("edgefleet_active_energy_joules", "Active energy (above the idle baseline) "
                                     "by whose CPU work it paid for: models (the agent's share while a model was "
                                     "busy), agent (its share while none was), other (other processes)",
                                     labels=["by", "method"])
        for part, value in (("models", a.models_j), ("agent", a.agent_j), ("other", a.other_j)):
            active.add_metric([part, e.method], value)
        yield active
        if e.power_w is not None:
            yield _gauge("edgefleet_host_power_watts", "Power of the domains counted in the total",
                         e.method, e.power_w)
        if a.idle_power_w is not None:
            yield GaugeMetricFamily("edgefleet_idle_power_watts", "The idle baseline used for attribution",
                                    value=a.idle_power_w)
        model = CounterMetricFamily("edgefleet_model_energy_joules", "Energy attributed to each model, in "
                                    "parts that add up: part=active: its share of the active energy the agent's "
                                    "CPU time explains, part=idle: its share of the idle baseline while it was "
                                    "busy; the sum of both is what the device drew while serving it",
                                    labels=["model", "part", "method"])
        for name, m in sorted(a.models.items()):
            model.add_metric([name, "active", e.method], m.energy_j)
            model.add_metric([name, "idle", e.method], max(0.0, m.energy_incl_idle_j - m.energy_j))
        yield model


#: edgefleet_model_tuned_info's labels besides `model` (runtime/tuning/settings.py AppliedTuning.labels)
TUNED_LABELS = ("kv_cache_type", "flash_attn", "prompt_chunk", "threads", "threads_batch", "ubatch")


def _tuned_info(models: ModelRegistry) -> GaugeMetricFamily:
    """1 per GGUF model serving with settings measured on this machine (runtime/tuning/), its
    settings as labels; absent for a model on its defaults (not measured yet, or tuning off)."""
    family = GaugeMetricFamily("edgefleet_model_tuned_info", "Settings measured on this machine that the model "
                               "runs with (edgefleet tune; absent: defaults)", labels=["model", *TUNED_LABELS])
    for served in models.serving():
        applied = getattr(served.backend, "tuning", None)
        if applied is not None:
            labels = applied.labels()
            family.add_metric([served.name, *(labels[k] for k in TUNED_LABELS)], 1)
    return family


def _gauge(name: str, help_: str, method: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_, labels=["method"])
    family.add_metric([method], value)
    return family


# ---- alerts (agent/fleet/alerts.py): Prometheus's ALERTS, one series per rule ----------------

#: (rule, severity, firing) for each rule that is on, read at scrape time
AlertGauges = Callable[[], Iterable[tuple[str, str, bool]]]


def watch_alerts(metrics: Metrics, gauges: AlertGauges) -> None:
    """``edgefleet_alert_firing{rule,severity}``: 1 while the rule's alert fires, 0 otherwise."""
    metrics.registry.register(_AlertCollector(gauges))


class _AlertCollector(Collector):
    def __init__(self, gauges: AlertGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("edgefleet_alert_firing", "1 while the alert rule fires (docs/operations.md#alerts)",
                                   labels=["rule", "severity"])
        for rule, severity, firing in self._gauges():
            family.add_metric([rule, severity], 1 if firing else 0)
        yield family


# ---- the request gate (security/gate.py): usage per API key, by name, never by secret ----------

def watch_gate(metrics: Metrics, counters: Callable[[], GateCounters]) -> None:
    """``edgefleet_key_requests_total{key,outcome}``, ``edgefleet_key_tokens_total{key,kind}``,
    ``edgefleet_auth_failures_total{reason}``, read from the gate at scrape time."""
    metrics.registry.register(_GateCollector(counters))


class _GateCollector(Collector):
    def __init__(self, counters: Callable[[], GateCounters]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters()
        requests = CounterMetricFamily("edgefleet_key_requests", "Calls per API key (its name, or cert:<CN>), by "
                                       "outcome: ok, denied (403), rate_limited (429)", labels=["key", "outcome"])
        for (key, outcome), value in sorted(counters.requests.items()):
            requests.add_metric([key, outcome], value)
        yield requests
        tokens = CounterMetricFamily("edgefleet_key_tokens", "Tokens used per API key, by kind: prompt, completion",
                                     labels=["key", "kind"])
        for (key, kind), value in sorted(counters.tokens.items()):
            tokens.add_metric([key, kind], value)
        yield tokens
        failures = CounterMetricFamily("edgefleet_auth_failures", "Failed authentications, by reason: missing, "
                                       "malformed, unknown, revoked, expired", labels=["reason"])
        for reason, value in sorted(counters.failures.items()):
            failures.add_metric([reason], value)
        yield failures


# ---- the audit log (agent/fleet/audit.py) ------------------------------------------------------


def watch_audit(metrics: Metrics, dropped: Callable[[], int], written: Callable[[], int]) -> None:
    """``edgefleet_audit_dropped_total`` (records the disk or the writer's queue refused) and
    ``edgefleet_audit_records_total`` (records written), read at scrape time."""
    metrics.registry.register(_AuditCollector(dropped, written))


class _AuditCollector(Collector):
    def __init__(self, dropped: Callable[[], int], written: Callable[[], int]) -> None:
        self._dropped, self._written = dropped, written

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("edgefleet_audit_dropped", "Audit records lost: the disk refused them (full, "
                                  "read-only) or the writer fell behind (docs/security.md#audit-log)",
                                  value=self._dropped())
        yield CounterMetricFamily("edgefleet_audit_records", "Audit records written (checkpoints included)",
                                  value=self._written())
