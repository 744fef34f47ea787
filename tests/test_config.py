"""The config file and environment overrides, and how mistakes are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_bind_to_localhost_without_a_key():
    config = load_config(None, environ={})
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert config.server.api_key is None and config.models == []


def test_file_and_environment_combine_environment_wins(tmp_path):
    path = write(tmp_path, """
state_dir = "/srv/ef"
[server]
port = 9000
[[models]]
name = "chat"
[[models]]
name = "embed"
path = "/opt/bundles/embed"
""")
    config = load_config(path, environ={"EDGEFLEET_SERVER__PORT": "9100", "EDGEFLEET_SERVER__API_KEY": "s3cret-key!",
                                        "EDGEFLEET_SCHEDULER__MAX_PENDING": "4"})
    assert config.server.port == 9100
    assert config.server.api_key == "s3cret-key!"
    assert config.scheduler.max_pending == 4
    assert config.bundle_path(config.models[0]) == Path("/srv/ef/models/chat/current")
    assert config.bundle_path(config.models[1]) == Path("/opt/bundles/embed")


@pytest.mark.parametrize(
    "text, environ, fragment",
    [
        ("[server]\nport = 'eighty'", {}, "server.port: expected an integer, got 'eighty'"),
        ("[server]\nport = 70000", {}, "server: port must be 0..65535"),
        ("[server]\nprot = 80", {}, "unknown key server.prot"),
        ("[sever]\nport = 80", {}, "unknown key sever"),
        ("[[models]]\nname = 'a b'", {}, "models[0]: invalid model name 'a b'"),
        ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'", {}, "'a' is listed twice"),
        ("[runtime]\ncpu_repack = 'maybe'", {}, "runtime.cpu_repack"),
        ("log_level = 'chatty'", {}, "log_level: expected one of"),
        ("[server\nport = 1", {}, "not valid TOML"),
        ("", {"EDGEFLEET_SERVER__PORT": "x1"}, "environment: server.port: expected an integer"),
        ("[mqtt]\nhost = 'b'\ndevice_id = 'a/b'", {}, "mqtt: device_id 'a/b' must be"),
        ("[mqtt]\nhost = 'b'\ngroup = '#'", {}, "mqtt: group '#' must be"),
        ("[mqtt]\nhost = 'b'\npassword = 'x'", {}, "mqtt: a password needs a username"),
        ("[mqtt]\nhost = 'b'\nca_file = '/ca.pem'", {}, "mqtt: ca_file / cert_file are set but tls = false"),
        ("[mqtt]\nhost = 'b'\nkeepalive_s = 1", {}, "mqtt: keepalive_s must be 5..65535"),
        ("[mqtt]\nhots = 'b'", {}, "unknown key mqtt.hots"),
        ("[limits]\nwebsocket_messages_per_s = 0", {}, "limits: websocket_messages_per_s must be at least 1, got 0"),
        ("[limits]\nwebsocket_max_in_flight = 0", {}, "limits: websocket_max_in_flight must be at least 1"),
    ],
)
def test_mistakes_are_reported_with_the_file_and_key(tmp_path, text, environ, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=environ)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", environ={})


def test_mqtt_is_off_by_default_and_configured_from_file_and_environment(tmp_path):
    assert not load_config(None, environ={}).mqtt.enabled
    path = write(tmp_path, """
[mqtt]
host = "broker.example"
tls = true
username = "dev-7"
password_file = "/etc/edgefleet/mqtt-password"
group = "shop-floor"
""")
    config = load_config(path, environ={"EDGEFLEET_MQTT__DEVICE_ID": "press-7"})
    mqtt = config.mqtt
    assert mqtt.enabled and mqtt.broker_port == 8883 and mqtt.tls
    assert mqtt.device_id == "press-7" and mqtt.client_id == "edgefleet-press-7" and mqtt.group == "shop-floor"


def test_the_default_device_id_is_a_valid_topic_level():
    from sync.mqtt.settings import ID_RE, default_device_id

    assert ID_RE.match(default_device_id())


def test_other_tools_variables_are_not_config_overrides(tmp_path):
    """The hub's EDGEFLEET_HUB / EDGEFLEET_HUB_MQTT and the package build's EDGEFLEET_WHEEL_CACHE
    live in the same shell as the agent; they are not config keys and must not break it."""
    others = {"EDGEFLEET_HUB": "/srv/edgefleet-hub", "EDGEFLEET_HUB_MQTT": "broker.example:1883",
              "EDGEFLEET_WHEEL_CACHE": "/tmp/wheels", "EDGEFLEET_TEST_ARM64": "1"}
    config = load_config(None, environ={**others, "EDGEFLEET_SERVER__PORT": "9100",
                                        "EDGEFLEET_STATE_DIR": "/srv/ef", "EDGEFLEET_LOG_LEVEL": "debug"})
    assert config.server.port == 9100 and config.state_dir == "/srv/ef" and config.log_level == "debug"


def test_a_mistyped_section_override_is_still_an_error():
    with pytest.raises(ConfigError, match="unknown key servr"):
        load_config(None, environ={"EDGEFLEET_SERVR__PORT": "9100"})
