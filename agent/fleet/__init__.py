"""The agent's side of the fleet: the MQTT link, signed updates and telemetry as app
cleanup contexts."""
