"""Alerts on the device: the ``[alerts]`` settings, the rule engine, the alert message.

Pure: values in, transitions and payloads out. agent/fleet/alerts.py reads the
values from the runtime, runs the engine on a timer and publishes what it says.
"""

from .engine import AlertBook, AlertState, CounterWindow, HistogramWindow, RuleTracker, Transition, quantile
from .payload import SCHEMA, alert_payload, message
from .settings import RULE_NAMES, AlertSettings, RuleSettings

__all__ = ["RULE_NAMES", "SCHEMA", "AlertBook", "AlertSettings", "AlertState", "CounterWindow", "HistogramWindow",
           "RuleSettings", "RuleTracker", "Transition", "alert_payload", "message", "quantile"]
