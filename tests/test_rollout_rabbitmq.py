"""A staged rollout on an MQTT 3.1.1 broker: Debian's RabbitMQ and its MQTT plugin.

Three real agents fall back to 3.1.1 on their own ("auto"), the real `hub control`
negotiates the same, and `hub rollout start` moves a share, then the rest, to completion.
RabbitMQ does not hand retained messages to wildcard subscriptions, so the controller
learns the fleet from what devices publish live: their reported state after every
connect, every look at the hub (each doorbell) and every job transition (docs/mqtt.md,
"MQTT 3.1.1 brokers").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMBED
from paho.mqtt.enums import MQTTProtocolVersion
from rabbitmq_broker import rabbitmq_installed, running_rabbitmq
from test_rollout import Fleet, cli, group_entry
from update_env import GROUP, make_release

DEVICES = ("site-1", "site-2", "site-3")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not rabbitmq_installed():
        pytest.skip("rabbitmq-server is not installed (scripts/setup.sh --test installs it)")
    root = tmp_path_factory.mktemp("rollout-rabbitmq")
    with running_rabbitmq(root) as broker:
        fleet = Fleet(root, broker, devices=DEVICES, protocol=MQTTProtocolVersion.MQTTv311)
        try:
            fleet.start()
            yield fleet
        finally:
            fleet.stop()


def test_a_staged_rollout_completes_on_rabbitmq(fleet: Fleet) -> None:
    bundle = make_release(Path(fleet.root / "seed/state/models" / EMBED / "current"), fleet.root / "release-2", "2",
                          onnx_note="release 2 on rabbitmq")
    done = cli("hub", "rollout", "start", "--hub", str(fleet.hub), "--group", GROUP, f"{EMBED}={bundle}",
               "--steps", "50,100", "--wait", "2s", "--min-devices", "2", "--mqtt", fleet.mqtt)
    assert done.returncode == 0, done
    rollout_id = re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]
    fleet.until(lambda: fleet.rollout(rollout_id)["state"] != "running", "the end of the rollout", 240)
    record = fleet.rollout(rollout_id)
    assert record["state"] == "completed", record
    assert [h["percent"] for h in record["history"] if h["event"] == "step"] == [50.0, 100.0]
    for device in DEVICES:
        fleet.until(lambda d=device: fleet.active(d) == "2", f"{device} serving 2")
        assert fleet.reported(device)["models"][EMBED]["desired"]["version"] == "2"
    entry = group_entry(fleet.root)
    assert entry["version"] == "2" and "rollout" not in entry
