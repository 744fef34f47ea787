"""Inference runtime: model bundles, backends, device choice, scheduling and the registry.

Knows nothing of HTTP or MQTT: the agent maps what happens here onto its interfaces.
"""
