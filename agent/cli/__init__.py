"""The `edgefleet` command line: serve, models, hub, doctor, and the demo bundles it builds."""

from agent.cli.main import main

__all__ = ["main"]
