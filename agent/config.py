"""The agent's one typed configuration: TOML file, then environment overrides.

Loaded once at start-up and validated completely before anything starts, so a
mistake is one clear line (``/etc/edgefleet/agent.toml: server.port: expected
an integer, got "80a"``) rather than a failure later. Every key can be
overridden by ``EDGEFLEET_<SECTION>__<KEY>`` (double underscore between
levels) or, for a top-level key, ``EDGEFLEET_<KEY>``, whose value is read as a
TOML value when it parses as one and as a string otherwise. Only names of that
shape are read: other ``EDGEFLEET_*`` variables belong to other tools (the hub's
``EDGEFLEET_HUB``, the package build's ``EDGEFLEET_WHEEL_CACHE``), while a
mistyped section (``EDGEFLEET_SERVR__PORT``) is still an error. New subsystems
(MQTT, hub, telemetry) add one dataclass and one field here; nothing else in
the loader changes.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.bundle import NAME_RE
from runtime.scheduling.batching import BatchingSettings
from runtime.structured import SchemaError, from_mapping
from security.audit import AuditSettings
from sync.alerts.settings import AlertSettings
from sync.mqtt.settings import MqttSettings
from sync.update_settings import UpdateSettings

ENV_PREFIX = "EDGEFLEET_"
DEFAULT_CONFIG_PATH = Path("/etc/edgefleet/agent.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def default_state_dir() -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/edgefleet as root, else
    the user's data directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/edgefleet"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "edgefleet")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: When set, every API request needs ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    #: Named API keys with scopes and limits (`edgefleet keys`); default ``<state_dir>/api-keys.json``.
    #: While the file exists, every API call needs a key from it (or api_key, or a mapped client
    #: certificate). It must be mode 0600; a SIGHUP re-reads it.
    api_keys_file: str | None = None
    #: Failed authentications from one source address per minute before its failures get 429.
    auth_failures_per_minute: int = 30
    max_body_bytes: int = 8 * 1024 * 1024
    #: How long shutdown and model swaps wait for admitted requests.
    drain_timeout_s: float = 30.0
    #: An idle keep-alive connection (or one that never sends a byte) is closed after this.
    keepalive_timeout_s: float = 15.0
    #: A request's line and headers must arrive within this long of their first byte.
    header_timeout_s: float = 10.0
    #: A request's body must arrive within this long of its headers (408 past it).
    body_timeout_s: float = 60.0
    #: A streamed response whose client reads nothing for this long (its buffers full) is
    #: ended and its model slot freed, as when the client leaves.
    write_timeout_s: float = 30.0
    #: Open connections at most; more are answered 503 and closed at once.
    max_connections: int = 256
    #: Longest request line and longest header line, in bytes (431 past it).
    max_header_bytes: int = 8190
    #: KServe v2 over gRPC on this port (same host); unset: no gRPC. 0: any free port (logged).
    grpc_port: int | None = None
    #: TLS on the HTTP and gRPC ports (both or neither of these two; PEM files). A SIGHUP
    #: re-reads them; a plain connection is not accepted on a TLS port.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: mTLS: client certificates issued by this CA (PEM) are verified.
    tls_client_ca_file: str | None = None
    #: With tls_client_ca_file: "required" (the default) refuses a handshake without a valid
    #: client certificate; "optional" verifies one when sent (HTTP; gRPC asks for none then).
    tls_client_cert: Literal["optional", "required"] | None = None
    #: The client certificate `edgefleet` commands on this machine present to the agent.
    tls_cli_cert_file: str | None = None
    tls_cli_key_file: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be 0..65535, got {self.grpc_port}")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port must differ from port ({self.port})")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        for name in ("drain_timeout_s", "keepalive_timeout_s", "header_timeout_s", "body_timeout_s",
                     "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not 1024 <= self.max_header_bytes <= 1 << 20:
            raise ValueError("max_header_bytes must be 1024..1048576")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key must have at least 8 characters (or be left unset)")
        if self.auth_failures_per_minute < 1:
            raise ValueError("auth_failures_per_minute must be at least 1")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (client "
                             "certificates are checked only over TLS)")
        if self.tls_client_cert is not None and self.tls_client_ca_file is None:
            raise ValueError("tls_client_cert needs tls_client_ca_file (the CA that issues client certificates)")
        if (self.tls_cli_cert_file is None) != (self.tls_cli_key_file is None):
            raise ValueError("tls_cli_cert_file and tls_cli_key_file go together: set both, or neither")

    @property
    def scheme(self) -> str:
        """How clients reach the HTTP port: "https" when TLS is on."""
        return "http" if self.tls_cert_file is None else "https"

    @property
    def client_cert_mode(self) -> Literal["off", "optional", "required"]:
        if self.tls_client_ca_file is None:
            return "off"
        return self.tls_client_cert or "required"


@dataclass(frozen=True)
class SchedulerConfig:
    #: Requests admitted per model (running + queued); more get 429 with Retry-After.
    max_pending: int = 16

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError("max_pending must be at least 1")


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits, checked before any expensive work (docs/configuration.md)."""

    #: Messages in one chat request.
    max_messages: int = 2048
    #: Characters in one prompt (all messages together, or the completion prompt).
    max_prompt_chars: int = 262_144
    #: Strings in one embeddings request.
    max_embedding_inputs: int = 2048
    #: Seconds of model time one request may use; generation stops with finish_reason
    #: "length" past it, other work gets a 400 model_time_exceeded.
    max_model_time_s: float = 120.0
    #: WebSocket /v1/realtime, per connection (agent/http/websocket.py): responses in flight,
    #: messages a second (a burst of twice that), and bytes of events held for a slow reader.
    websocket_max_in_flight: int = 16
    websocket_messages_per_s: float = 100.0
    websocket_buffer_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_prompt_chars", "max_embedding_inputs", "websocket_max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.max_model_time_s > 0:
            raise ValueError("max_model_time_s must be more than 0")
        if not self.websocket_messages_per_s >= 1:
            raise ValueError(f"websocket_messages_per_s must be at least 1, got {self.websocket_messages_per_s:g}")
        if self.websocket_buffer_bytes < 4096:
            raise ValueError(f"websocket_buffer_bytes must be at least 4096 (one event), got "
                             f"{self.websocket_buffer_bytes}")


def default_memory_budget_mb() -> int:
    """An eighth of the machine's memory, between 256 MB and 2 GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError):
        total = 4096
    return int(min(2048, max(256, total // 8)))


@dataclass(frozen=True)
class RuntimeConfig:
    #: Threads per model; 0 sizes them to the machine's cores.
    threads: int = 0
    #: llama.cpp CPU weight repacking: "auto" turns it off on AMX CPUs only.
    cpu_repack: bool | Literal["auto"] = "auto"
    #: Working memory for requests, in MB, shared by the models (0: an eighth of the
    #: machine's memory, 256 MB to 2 GB). Each model gets an equal share unless its
    #: [[models]] entry sets memory_budget_mb.
    memory_budget_mb: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("threads must be 0 (auto) or more")
        if self.memory_budget_mb < 0:
            raise ValueError("memory_budget_mb must be 0 (auto) or more")

    def budget_mb(self) -> int:
        return self.memory_budget_mb or default_memory_budget_mb()


@dataclass(frozen=True)
class ModelEntry:
    name: str
    #: Bundle directory; default ``<state_dir>/models/<name>/current``.
    path: str | None = None
    #: Working memory one request may use on this model, in MB (0: an equal share of
    #: runtime.memory_budget_mb).
    memory_budget_mb: int = 0
    #: Energy saving: unload the model after this many seconds without a request; the
    #: next request reloads it (and waits for the load). 0: stays loaded.
    keep_alive_s: float = 0.0

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"invalid model name {self.name!r}")
        if self.memory_budget_mb < 0:
            raise ValueError("memory_budget_mb must be 0 (its share) or more")
        if self.keep_alive_s < 0:
            raise ValueError("keep_alive_s must be 0 (stays loaded) or more")


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: energy and system sampling, and the MQTT telemetry records (docs/telemetry.md)."""

    #: false: no sampling, no records (and no system or energy figures in /metrics).
    enabled: bool = True
    #: Seconds between telemetry records (published on MQTT when [mqtt] is configured).
    interval_s: float = 10.0
    #: Seconds between energy readings (also the attribution window).
    energy_sample_s: float = 1.0
    #: Records kept on disk while the broker is away; past it the oldest are dropped and counted.
    outbox_max_records: int = 10_000
    #: The CPU estimate's power model, per logical CPU (used only where nothing is measured).
    estimate_idle_w_per_cpu: float = 0.74
    estimate_max_w_per_cpu: float = 3.5
    #: An energy delta implying more than this (per domain) is a reset or garbage, not energy.
    max_plausible_w: float = 10_000.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.interval_s <= 86_400:
            raise ValueError("interval_s must be 0.1..86400")
        if not 0.05 <= self.energy_sample_s <= self.interval_s:
            raise ValueError("energy_sample_s must be at least 0.05 and at most interval_s")
        if self.outbox_max_records < 1:
            raise ValueError("outbox_max_records must be at least 1")
        if not 0 <= self.estimate_idle_w_per_cpu <= self.estimate_max_w_per_cpu:
            raise ValueError("estimate_idle_w_per_cpu must be 0..estimate_max_w_per_cpu")
        if not self.max_plausible_w > 0:
            raise ValueError("max_plausible_w must be more than 0")


#: The knobs `[tuning] knobs` may name (runtime/tuning/settings.py KNOBS).
TUNING_KNOBS = ("attention", "prompt_chunk", "threads_batch", "threads", "ubatch", "repack")


@dataclass(frozen=True)
class TuningConfig:
    """``[tuning]``: llama.cpp settings measured per GGUF model on this machine (runtime/tuning/)."""

    #: "background": measure after READY, apply at the model's reload; "before_ready": measure
    #: before loading (READY waits); "off": never measure at start (a choice `edgefleet tune`
    #: saved is still applied). A model is measured again when the CPU, GPU, llama.cpp build or
    #: model file changes.
    mode: Literal["background", "before_ready", "off"] = "background"
    #: Seconds one model's search may take; candidates past it are skipped.
    budget_s: float = 30.0
    #: A candidate whose measuring process runs longer is killed and marked unsafe.
    candidate_timeout_s: float = 60.0
    #: Knobs to search (empty: all): attention, prompt_chunk, threads_batch, threads, ubatch, repack.
    knobs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.budget_s > 0 or not self.candidate_timeout_s > 0:
            raise ValueError("budget_s and candidate_timeout_s must be more than 0")
        unknown = [k for k in self.knobs if k not in TUNING_KNOBS]
        if unknown:
            raise ValueError(f"knobs: unknown knob {unknown[0]!r} (known: {', '.join(TUNING_KNOBS)})")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = field(default_factory=default_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    models: list[ModelEntry] = field(default_factory=list)
    #: ``[mqtt]``: the broker link (sync/mqtt/settings.py); off while ``mqtt.host`` is unset.
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    #: ``[updates]``: signed model updates from a hub (sync/update_settings.py); off while ``hub_url`` is unset.
    updates: UpdateSettings = field(default_factory=UpdateSettings)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    #: ``[batching]``: continuous batching for GGUF, dynamic batching for ONNX (runtime/scheduling/batching.py).
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    #: ``[alerts]``: rules evaluated on the device, published on MQTT (sync/alerts/settings.py).
    alerts: AlertSettings = field(default_factory=AlertSettings)
    #: ``[audit]``: the tamper-evident audit log (security/audit.py).
    audit: AuditSettings = field(default_factory=AuditSettings)
    #: ``[tuning]``: per-machine tuning of GGUF models (runtime/tuning/).
    tuning: TuningConfig = field(default_factory=TuningConfig)

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: {duplicates[0]!r} is listed twice")

    def bundle_path(self, entry: ModelEntry) -> Path:
        if entry.path:
            path = Path(entry.path)
            return path if path.is_absolute() else Path(self.state_dir) / "models" / path
        return Path(self.state_dir) / "models" / entry.name / "current"

    def api_keys_path(self) -> Path:
        """The API keys file: server.api_keys_file (relative to the state dir), else <state_dir>/api-keys.json."""
        return Path(self.state_dir) / (self.server.api_keys_file or "api-keys.json")

    def model_budget_mb(self, name: str) -> int:
        """Working memory one request may use on model `name`."""
        entry = next((m for m in self.models if m.name == name), None)
        if entry is not None and entry.memory_budget_mb:
            return entry.memory_budget_mb
        shared = max(1, sum(1 for m in self.models if not m.memory_budget_mb))
        return max(64, self.runtime.budget_mb() // shared)

    def with_overrides(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)


def is_config_override(key: str) -> bool:
    """Whether environment variable `key` sets a config key: ``EDGEFLEET_<SECTION>__<KEY>``, or
    ``EDGEFLEET_<KEY>`` for a top-level key. ``EDGEFLEET_CONFIG`` names the file, and the other
    tools' variables (``EDGEFLEET_HUB``, ``EDGEFLEET_HUB_MQTT``, ``EDGEFLEET_WHEEL_CACHE``) have
    neither shape, so they never reach the loader."""
    if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
        return False
    name = key[len(ENV_PREFIX):]
    return "__" in name or name.lower() in {f.name for f in dataclasses.fields(AgentConfig)}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not is_config_override(key):
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {key}: conflicts with another override")
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read `path` (if any) and the environment into a validated AgentConfig."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    overrides = _env_overrides(environ)
    if overrides:
        data = _merge(data, overrides)
        source += " + environment"
    try:
        return from_mapping(AgentConfig, data)
    except SchemaError as exc:
        raise ConfigError(f"{source}: {exc}") from None
