"""The edgefleet daemon: configuration, CLI, HTTP API and lifecycle.

It wires the runtime (and later sync and security) together and is the only
layer that knows about HTTP.
"""

__version__ = "0.1.0"
