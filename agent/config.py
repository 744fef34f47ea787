"""The agent's one typed configuration: TOML file, then environment overrides.

Loaded once at start-up and validated completely before anything starts, so a
mistake is one clear line (``/etc/edgefleet/agent.toml: server.port: expected
an integer, got "80a"``) rather than a failure later. Every key can be
overridden by ``EDGEFLEET_<SECTION>__<KEY>`` (double underscore between
levels), whose value is read as a TOML value when it parses as one and as a
string otherwise. New subsystems (MQTT, hub, telemetry) add one dataclass and
one field here; nothing else in the loader changes.
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
from runtime.structured import SchemaError, from_mapping

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
    max_body_bytes: int = 8 * 1024 * 1024
    #: How long shutdown and model swaps wait for admitted requests.
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key must have at least 8 characters (or be left unset)")


@dataclass(frozen=True)
class SchedulerConfig:
    #: Requests admitted per model (running + queued); more get 429 with Retry-After.
    max_pending: int = 16

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError("max_pending must be at least 1")


@dataclass(frozen=True)
class RuntimeConfig:
    #: Threads per model; 0 sizes them to the machine's cores.
    threads: int = 0
    #: llama.cpp CPU weight repacking: "auto" turns it off on AMX CPUs only.
    cpu_repack: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("threads must be 0 (auto) or more")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    #: Bundle directory; default ``<state_dir>/models/<name>/current``.
    path: str | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"invalid model name {self.name!r}")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: str = field(default_factory=default_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    models: list[ModelEntry] = field(default_factory=list)

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

    def with_overrides(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
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
