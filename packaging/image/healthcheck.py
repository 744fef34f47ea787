"""The container image's HEALTHCHECK: exit 0 when the agent's /readyz answers 200.

Installed by packaging/build-image.sh as /usr/local/lib/edgefleet/healthcheck.py and run
by the container runtime inside the container with the venv's python. The port comes
from the same configuration the agent reads (the mounted /etc/edgefleet/agent.toml or
$EDGEFLEET_CONFIG, then the EDGEFLEET_* environment overrides), so a changed port needs
no second setting. /readyz is open without the API key, and says 503 while a configured
model is loading or has failed, and while the agent drains on SIGTERM: exactly when a
load balancer should send nothing. Prints one line either way (`podman healthcheck run`,
`docker inspect` show it).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from agent.cli.main import config_path
from agent.config import ConfigError, load_config
from security.tls_server import local_client_context


def probe_host(host: str) -> str:
    """Where to reach a server bound to `host` from inside its own network namespace."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def main() -> int:
    try:
        server = load_config(config_path(None)).server
    except ConfigError as exc:
        print(f"unhealthy: config error: {exc}")
        return 1
    url = f"{server.scheme}://{probe_host(server.host)}:{server.port}/readyz"
    try:  # over TLS, trusting exactly the agent's own certificate (security/tls_server.py)
        context = None if server.tls_cert_file is None else local_client_context(
            server.tls_cert_file, server.tls_cli_cert_file, server.tls_cli_key_file)
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            print(f"ready: {url} {response.status}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"not ready: {url} {exc.code} {exc.read(300).decode('utf-8', 'replace')}")
    except (OSError, ValueError) as exc:
        print(f"not ready: {url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
