"""The argparse side of `edgefleet models import / pull / ps / rm` (agent/cli/models_local.py,
agent/cli/models_pull.py do the work); kept apart so agent/cli/main.py stays a table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig


def add_local_model_commands(commands: Any, add_config: Callable[[argparse.ArgumentParser], None]) -> None:
    imp = commands.add_parser("import", help="serve a .gguf, .onnx or bundle directory without a hub")
    add_config(imp)
    imp.add_argument("path", type=Path, help="a .gguf file, an .onnx file or a bundle directory (model.toml)")
    imp.add_argument("--name", help="the model's name (default: from the file name)")
    imp.add_argument("--version", help="the version (default: sha-<first 12 hex of its sha256>)")
    pull = commands.add_parser("pull", help="download a .gguf or .onnx (resumable, verified), then import it")
    add_config(pull)
    pull.add_argument("url", help="https:// (or http://) URL of the file")
    pull.add_argument("--sha256", help="the file's sha256: the download is refused unless it matches")
    pull.add_argument("--unsigned", action="store_true",
                      help="pull without --sha256 (trusting the server; recorded in the audit log)")
    pull.add_argument("--name", help="the model's name (default: from the URL's file name)")
    pull.add_argument("--version", help="the version (default: sha-<first 12 hex of its sha256>)")
    ps = commands.add_parser("ps", help="models the running agent has loaded: size, last use, keep-alive")
    add_config(ps)
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    rm = commands.add_parser("rm", help="delete a model (NAME) or one version (NAME@VERSION) from the store")
    add_config(rm)
    rm.add_argument("target", metavar="NAME[@VERSION]")
    rm.add_argument("--force", action="store_true", help="unload it first if it serves")
    rm.add_argument("--json", action="store_true", help="machine-readable output")


def run_local_model_command(args: argparse.Namespace, config: AgentConfig) -> int:
    from agent.cli import models_local, models_pull

    if args.models_command == "import":
        return models_local.import_command(config, args.path, args.name, args.version)
    if args.models_command == "pull":
        return models_pull.pull_command(config, args.url, args.sha256, args.unsigned, args.name, args.version)
    if args.models_command == "ps":
        return models_local.ps_command(config, args.json)
    if args.models_command == "rm":
        return models_local.rm_command(config, args.target, args.force, args.json)
    raise AssertionError(args.models_command)
