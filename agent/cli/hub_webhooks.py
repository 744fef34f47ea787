"""`edgefleet hub webhooks`: post fleet events to the URLs of ``<hub>/webhooks.toml``.

    webhooks [--check]   long-running (sync/hub/webhooks/service.py); --check reads the
                         configuration and the key files, prints the endpoints and exits

A configuration that cannot be used is one line on stderr and exit 2, before anything
connects. The work lives in sync/hub/webhooks/.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # paho: loaded when the command runs, not when the parser is built
    from sync.hub.mqtt_tools import Broker


def add_webhooks_command(sub: Any, add_hub_dir: Any, add_mqtt_args: Any) -> None:
    webhooks = sub.add_parser("webhooks", help="post fleet events (offline, updates, rollouts, alerts) to the URLs "
                                               "in <hub>/webhooks.toml, signed (long-running)")
    add_hub_dir(webhooks)
    add_mqtt_args(webhooks)
    webhooks.add_argument("--check", action="store_true",
                          help="check webhooks.toml and its key files, print the endpoints, and exit")


def run_webhooks_command(args: argparse.Namespace, broker: Broker, error: Any) -> int:
    from agent.lifecycle.logs import setup_logging
    from sync.hub.webhooks.config import WebhookConfigError, load_endpoints
    from sync.hub.webhooks.service import run_webhooks

    try:
        endpoints = load_endpoints(args.dir)
    except WebhookConfigError as exc:
        raise error(str(exc), 2) from None
    if args.check:
        for endpoint in endpoints:
            print(f"{endpoint.name}: {endpoint.url} events {', '.join(endpoint.events)} "
                  f"(timeout {endpoint.timeout_s:g}s, queue {endpoint.max_queue})")
        return 0
    setup_logging("info")
    run_webhooks(args.dir, broker, args.topic_prefix, endpoints)
    return 0
