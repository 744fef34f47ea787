"""The telemetry record, schema ``edgefleet.telemetry/1`` (every field: docs/telemetry.md).

Built from the runtime's own figures — the registry's per-model usage, the
sampler's system sample, energy snapshot and attribution — so /metrics and MQTT
report the same numbers. Names follow OpenTelemetry's semantic conventions where
one exists (``system.cpu.utilization``, ``hw.energy``, ``hw.power``,
``hw.host.energy``, ``process.memory.usage``...). Counters are cumulative since
``start_time``: a consumer that loses or repeats a record loses no joules, and
sees a restart as a new ``run_id`` (and a reboot as a new ``boot_id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.energy import AttributionSnapshot, EnergySnapshot
from runtime.registry import ModelRegistry
from runtime.served_model import ModelUsage
from runtime.system import SystemSample

from .outbox import OutboxStats
from .publisher import StorageHealth

if TYPE_CHECKING:  # the link's module imports paho: only an agent with [mqtt] loads it
    from ..mqtt import LinkStatus

SCHEMA = "edgefleet.telemetry/1"


@dataclass(frozen=True)
class RecordHeader:
    device_id: str
    group: str
    agent_version: str
    boot_id: str
    #: a random id for this agent process: counters restart from 0 when it changes
    run_id: str
    #: Unix time the counters start from (the agent's start)
    start_time: float
    interval_s: float


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def system_fields(s: SystemSample) -> dict[str, Any]:
    return {
        "system.cpu.utilization": _r(s.cpu_utilization, 4),
        "system.cpu.utilization.per_cpu": [_r(u, 4) for u in s.cpu_utilization_per_cpu],
        "system.cpu.logical.count": s.cpu_count,
        "system.cpu.load_average.1m": _r(s.load_1m, 2),
        "system.cpu.load_average.5m": _r(s.load_5m, 2),
        "system.cpu.load_average.15m": _r(s.load_15m, 2),
        "system.memory.usage": {"used": s.memory_used_bytes, "available": s.memory_available_bytes},
        "system.memory.limit": s.memory_total_bytes,
        "system.paging.usage": {"used": s.swap_used_bytes, "free": s.swap_total_bytes - s.swap_used_bytes},
        "system.filesystem.usage": {"used": s.disk_used_bytes, "free": s.disk_free_bytes},
        "system.filesystem.mountpoint": s.disk_path,
        "system.network.io": {"receive": s.network_rx_bytes, "transmit": s.network_tx_bytes},
        "system.network.errors": {"receive": s.network_rx_errors, "transmit": s.network_tx_errors},
        "hw.temperature": {label: _r(c, 1) for label, c in s.temperatures_c.items()},
        "system.uptime": _r(s.system_uptime_s, 1),
        "process.cpu.time": _r(s.process_cpu_seconds, 2),
        "process.cpu.utilization": _r(s.process_cpu_utilization, 4),
        "process.memory.usage": s.process_rss_bytes,
        "process.thread.count": s.process_threads,
        "process.open_file_descriptor.count": s.process_open_fds,
        "process.uptime": _r(s.process_uptime_s, 1),
        "unavailable": s.unavailable,
    }


def energy_fields(e: EnergySnapshot, a: AttributionSnapshot) -> dict[str, Any]:
    counted = [d for d in e.domains if d.in_total]
    return {
        "method": e.method,
        "estimate_model": e.estimate_model,
        "hw.host.energy": _r(e.total_j),
        "hw.host.power": _r(e.power_w),
        "covers": {"domains": [f"{d.source}:{d.domain}" for d in counted],
                   "sources": [s.description for s in e.sources if s.used]},
        "domains": [{
            "hw.id": d.domain, "source": d.source, "method": d.method, "in_total": d.in_total,
            "hw.energy": _r(d.energy_j), "hw.power": _r(d.power_w),
            "wraps": d.wraps, "resets": d.resets, "dropped_samples": d.dropped_samples,
        } for d in e.domains],
        "sources": [{"name": s.name, "method": s.method, "used": s.used, "available": s.available,
                     "reason": s.reason} for s in e.sources],
        "attribution": {
            "total_j": _r(a.total_j), "active_j": _r(a.active_j), "idle_j": _r(a.idle_j),
            "idle_power_w": _r(a.idle_power_w), "idle_power_learnt": a.idle_power_learnt,
            "attributed_s": _r(a.attributed_s, 1), "unattributed_s": _r(a.unattributed_s, 1),
            "models_j": _r(a.models_j), "agent_j": _r(a.agent_j), "other_j": _r(a.other_j),
            "agent_cpu_share": _r(a.agent_cpu_s / a.busy_cpu_s, 4) if a.busy_cpu_s > 0 else None,
        },
    }


def model_fields(models: ModelRegistry, attribution: AttributionSnapshot | None) -> dict[str, Any]:
    statuses = {s.name: s for s in models.statuses()}
    depths = {s.name: s.scheduler.depth for s in models.serving()}
    # settings measured on this machine (runtime/tuning/), None for a model on its defaults
    tuned = {s.name: t.to_json() for s in models.serving() if (t := getattr(s.backend, "tuning", None)) is not None}
    busy = models.busy_seconds()
    out: dict[str, Any] = {}
    usages = models.usage()
    for name in sorted(set(usages) | set(statuses)):  # loading or failed models too, with zero counts
        usage = usages.get(name) or ModelUsage()
        status = statuses.get(name)
        energy = attribution.models.get(name) if attribution else None
        q = usage.queue
        requests = usage.total_requests
        gen = usage.generated_tokens
        joules = energy.energy_j if energy else 0.0
        joules_idle = energy.energy_incl_idle_j if energy else 0.0
        ttft = usage.time_to_first_token
        out[name] = {
            "version": status.version if status else None,
            "state": status.state.value if status else "removed",
            "keep_alive_s": models.keep_alive_s.get(name, 0.0),
            "tuned": tuned.get(name),
            "idle_unloads": usage.idle_unloads,
            "reloads": usage.reloads,
            "requests": dict(usage.requests),
            "admitted": q.admitted, "rejected": q.rejected, "completed": q.completed,
            "failed": q.failed, "cancelled": q.cancelled,
            "queue_depth": depths.get(name, 0),
            "busy_s": _r(busy.get(name, q.busy_seconds)),
            "prompt_tokens": usage.prompt_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens,
            "generated_tokens": gen,
            "embedded_inputs": usage.embedded_inputs,
            "time_to_first_token_s": {"count": ttft.count, "sum": _r(ttft.sum_s),
                                      "buckets": [[le, n] for le, n in ttft.cumulative()]},
            "energy_j": _r(joules),
            "energy_incl_idle_j": _r(joules_idle),
            "joules_per_request": _r(joules / requests, 4) if requests else None,
            "joules_per_token": _r(joules / gen, 5) if gen else None,
            "joules_per_token_incl_idle": _r(joules_idle / gen, 5) if gen else None,
        }
    return out


def build_record(seq: int, header: RecordHeader, time_s: float, models: ModelRegistry,
                 system: SystemSample | None, energy: EnergySnapshot | None,
                 attribution: AttributionSnapshot | None, outbox: OutboxStats,
                 link: LinkStatus | None, published: int, storage: StorageHealth | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "seq": seq,
        "device_id": header.device_id,
        "group": header.group,
        "agent_version": header.agent_version,
        "boot_id": header.boot_id,
        "run_id": header.run_id,
        "start_time": round(header.start_time, 3),
        "time": round(time_s, 3),
        "interval_s": header.interval_s,
        "system": system_fields(system) if system else None,
        "energy": energy_fields(energy, attribution) if energy and attribution else None,
        "models": model_fields(models, attribution),
        "telemetry": {"outbox_queued": outbox.queued, "outbox_dropped": outbox.dropped,
                      "outbox_refused": outbox.refused, "published": published,
                      "storage_error": storage.error if storage else None,
                      "records_lost": storage.lost(outbox) if storage else outbox.lost,
                      "mqtt_connects": link.connects if link else 0,
                      "mqtt_disconnects": link.disconnects if link else 0,
                      "mqtt_send_dropped": link.send.dropped if link else 0},
    }
