"""The topic tree, in one place (documented in docs/mqtt.md).

``{prefix}`` is ``edgefleet/v1`` unless configured: the ``v1`` level versions the
tree itself; each payload also carries its own ``schema`` name and version.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    group: str
    device_id: str

    @property
    def group_desired(self) -> str:
        """Retained, hub -> agents of the group: what the group should run (a doorbell)."""
        return f"{self.prefix}/groups/{self.group}/desired"

    @property
    def device_desired(self) -> str:
        """Retained, hub -> this agent: a per-device override."""
        return f"{self.device}/desired"

    @property
    def cmd(self) -> str:
        """Hub -> this agent: commands; replies go to the MQTT 5 response topic."""
        return f"{self.device}/cmd"

    @property
    def state(self) -> str:
        """Retained, agent -> hub: birth (online, versions) and Last Will (offline)."""
        return f"{self.device}/state"

    @property
    def update(self) -> str:
        """Agent -> hub: update job status transitions."""
        return f"{self.device}/update"

    @property
    def reported(self) -> str:
        """Retained, agent -> hub: what the device runs beside what it was told to run."""
        return f"{self.device}/reported"

    @property
    def telemetry(self) -> str:
        """Agent -> hub: metrics and energy, QoS 1, store-and-forward."""
        return f"{self.device}/telemetry"

    def alert(self, rule: str) -> str:
        """Agent -> hub: one alert rule's firing/resolved, QoS 1, retained while firing."""
        return f"{self.device}/alerts/{rule}"

    @property
    def device(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}"
