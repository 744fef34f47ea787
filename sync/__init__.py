"""Everything that talks to the hub: MQTT link, desired state, downloads, telemetry.

Talks to the runtime only through `runtime.registry.ModelRegistry`'s public
methods (load, unload, statuses). Filled in by the signed-update and telemetry work.
"""
