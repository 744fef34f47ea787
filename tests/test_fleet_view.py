"""The fleet view: rollouts on MQTT, the hub-side fleet model fed by every device topic, and
the page itself in a real browser (Debian's chromium driven by Playwright) against a real
mosquitto, real agents and simulated devices published as retained messages of the real
schemas."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EMBED
from mqtt_broker import MosquittoBroker, Watcher
from update_env import GROUP, create_hub, embedding_state, make_release

from sync.hub.fleet import FleetView

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edgefleet/v1"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ---- the hub-side fleet model: telemetry, alerts, rollouts --------------------------------------


def test_the_fleet_model_keeps_telemetry_rates_firing_alerts_and_rollouts_and_counts_junk() -> None:
    from fleet_view_sim import alert, telemetry

    fleet = FleetView(PREFIX)
    t = 1_800_000_000.0
    for k, tokens in ((1, 100), (2, 600)):
        body = telemetry("d1", "lab", k, t + 5 * k, tokens)
        assert fleet.ingest(f"{PREFIX}/devices/d1/telemetry", json.dumps(body).encode(), t)
    view = fleet.devices["d1"]
    assert view.telemetry is not None and view.telemetry["seq"] == 2
    assert view.tokens_per_s["smollm2-135m-instruct"] == 100.0  # 500 tokens in 5 s
    topic = f"{PREFIX}/devices/d1/alerts/temperature"
    assert fleet.ingest(topic, json.dumps(alert("d1", "lab", "temperature")).encode(), t)
    assert set(view.alerts) == {"temperature"}
    assert fleet.ingest(topic, json.dumps(alert("d1", "lab", "temperature", "resolved")).encode(), t)
    assert view.alerts == {}
    fleet.ingest(topic, json.dumps(alert("d1", "lab", "temperature")).encode(), t)
    assert fleet.ingest(topic, b"", t) and view.alerts == {}  # the retained copy cleared
    rollout = {"schema": "edgefleet.rollout/1", "id": "r-1", "group": "lab", "plan": {"steps": [100.0]}}
    assert fleet.ingest(f"{PREFIX}/rollouts/r-1", json.dumps(rollout).encode(), t) and "r-1" in fleet.rollouts
    junk = [(f"{PREFIX}/devices/d1/telemetry", b"[1]", "malformed"),
            (f"{PREFIX}/devices/d1/telemetry", b'{"schema": "acme/1"}', "not-ours"),
            (f"{PREFIX}/devices/d1/alerts/disk", json.dumps(alert("d2", "lab", "disk")).encode(), "other-device"),
            (f"{PREFIX}/devices/d1/alerts/disk", json.dumps(alert("d1", "lab", "temperature")).encode(), "malformed"),
            (f"{PREFIX}/rollouts/r-2", json.dumps(rollout).encode(), "malformed"),
            (f"{PREFIX}/rollouts/r-1", b"x" * (2 * 1024 * 1024), "too-large")]
    for topic, payload, reason in junk:
        before = fleet.ignored[reason]
        assert not fleet.ingest(topic, payload, t), topic
        assert fleet.ignored[reason] == before + 1, (topic, dict(fleet.ignored))
    assert fleet.rollouts["r-1"]["id"] == "r-1" and set(view.alerts) == set()


# ---- rollouts on MQTT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = embedding_state(tmp_path_factory.mktemp("view-hub"))
    create_hub(root / "hub", root / "state", (EMBED,))
    return root


def _start_rollout(env: Path, broker: str, version: str, *extra: str) -> str:
    bundle = env / f"release-{version}"
    if not bundle.exists():
        make_release(env / "state/models" / EMBED / "current", bundle, version, onnx_note=f"release {version}")
    done = cli("hub", "rollout", "start", "--hub", str(env / "hub"), "--group", GROUP, f"{EMBED}={bundle}",
               "--steps", "50,100", "--wait", "1m", "--mqtt", broker, *extra)
    assert done.returncode == 0, done
    return re.search(r"rollout (r-[0-9a-f]+) started", done.stdout).group(1)  # type: ignore[union-attr]


def test_rollout_commands_publish_the_status_retained_on_the_rollout_topic(
        hub_env: Path, mqtt_broker: MosquittoBroker) -> None:
    hub = str(hub_env / "hub")
    broker = f"{mqtt_broker.host}:{mqtt_broker.port}"
    rollout_id = _start_rollout(hub_env, broker, "2")
    topic = f"{PREFIX}/rollouts/{rollout_id}"
    with Watcher(mqtt_broker, f"{PREFIX}/rollouts/+") as late:  # subscribed after: the retained copy
        (first,) = late.wait_for(topic)
    assert first.retain
    body = json.loads(first.payload)
    status = json.loads(cli("hub", "rollout", "status", "--hub", hub, rollout_id, "--json").stdout)
    status.pop("controller")
    assert body.pop("at") > 0 and body == status, (body, status)
    assert body["schema"] == "edgefleet.rollout/1" and body["state"] == "running" and body["percent"] == 50.0

    with Watcher(mqtt_broker, topic) as watcher:
        watcher.wait_for(topic)  # the retained one
        done = cli("hub", "rollout", "pause", "--hub", hub, rollout_id, "--mqtt", broker)
        assert done.returncode == 0 and f"status published on {topic}" in done.stdout, done
        paused = json.loads(watcher.wait_for(topic, 2)[-1].payload)
        assert paused["state"] == "paused" and paused["reason"] == "paused by the operator"
        done = cli("hub", "rollout", "abort", "--hub", hub, rollout_id, "--mqtt", broker)
        assert done.returncode == 0, done
        aborted = json.loads(watcher.wait_for(topic, 3)[-1].payload)
        assert aborted["state"] == "aborted" and aborted["history"][-1]["event"] == "aborted"


def test_a_rollout_command_with_the_broker_away_says_so_and_succeeds(hub_env: Path, tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)  # never started: nothing listens on its port
    rollout_id = _start_rollout(hub_env, f"{broker.host}:{broker.port}", "3")
    done = cli("hub", "rollout", "abort", "--hub", str(hub_env / "hub"), rollout_id, "--mqtt",
               f"{broker.host}:{broker.port}")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done
    assert "rollout status not published on MQTT" in done.stdout, done.stdout


def test_the_controller_publishes_each_rollout_change_and_everything_again_after_a_broker_restart(
        hub_env: Path, mqtt_broker: MosquittoBroker) -> None:
    hub = str(hub_env / "hub")
    broker = f"{mqtt_broker.host}:{mqtt_broker.port}"
    rollout_id = _start_rollout(hub_env, broker, "4", "--no-doorbell")  # no MQTT from the CLI
    topic = f"{PREFIX}/rollouts/{rollout_id}"
    log = (hub_env / "control.log").open("wb")
    control = subprocess.Popen([sys.executable, "-m", "agent", "hub", "control", "--hub", hub, "--mqtt", broker,
                                "--interval", "0.3s"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Watcher(mqtt_broker, topic) as watcher:
            assert json.loads(watcher.wait_for(topic)[-1].payload)["state"] == "running"
            # a change made without MQTT (the CLI with --no-doorbell is the same): the controller publishes it
            assert cli("hub", "rollout", "pause", "--hub", hub, rollout_id, "--mqtt", "127.0.0.1:9").returncode == 0
            deadline = time.monotonic() + 20
            while json.loads(watcher.on(topic)[-1].payload)["state"] != "paused":
                assert time.monotonic() < deadline, [m.payload[:80] for m in watcher.on(topic)]
                time.sleep(0.1)
        mqtt_broker.restart()  # persistence off: every retained message is gone
        with Watcher(mqtt_broker, topic) as watcher:
            assert json.loads(watcher.wait_for(topic, timeout_s=30)[-1].payload)["state"] == "paused"
    finally:
        control.terminate()
        assert control.wait(30) == 0
        assert cli("hub", "rollout", "abort", "--hub", hub, rollout_id, "--mqtt", broker).returncode == 0


# ---- the page in a real browser -----------------------------------------------------------------

AGENTS = ("press-1", "press-2")
#: the real agent whose disk alert fires (never the one a test kills)
ALERTING = AGENTS[0]


def disk_threshold(path: Path) -> float:
    import psutil

    return max(0.0, round(psutil.disk_usage(str(path)).percent - 10, 1))


def disk_rule(threshold: float) -> str:
    return f"[alerts.disk]\nthreshold = {threshold}\nresolve = {threshold}\nfor_s = 0\nclear_for_s = 0\n"
KEEPALIVE_S = 5  # the agents' MQTT keep-alive: the broker sends the Last Will after 1.5 x this
SIM_GROUP = "warehouse"


class ViewFleet:
    """A real mosquitto, two real agents (the embedding model only), `hub view`, simulated devices."""

    def __init__(self, root: Path) -> None:
        from conftest import free_port
        from fleet_view_sim import Publisher

        self.root = root
        self.broker = MosquittoBroker(root)
        self.broker.start()
        self.agents: dict[str, Any] = {}
        self.port = free_port()
        log = (root / "view.log").open("wb")
        self.view = subprocess.Popen([sys.executable, "-m", "agent", "hub", "view", "--mqtt", self.mqtt,
                                      "--port", str(self.port), "--history", str(root / "history.sqlite3")],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        from service_process import ServiceProcess, write_config

        self.configs: dict[str, Path] = {}
        for device in AGENTS:
            home = embedding_state(root / device)
            extra = (f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\ndevice_id = "{device}"\n'
                     f'group = "{GROUP}"\nkeepalive_s = {KEEPALIVE_S}\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
                     "[telemetry]\ninterval_s = 1.0\nenergy_sample_s = 0.5\n")
            if device == ALERTING:  # its disk rule set below what the real filesystem uses: it fires
                extra += "[alerts]\ninterval_s = 0.5\n" + disk_rule(disk_threshold(home))
            config = write_config(home / "agent.toml", home / "state", free_port(), [EMBED], extra=extra)
            self.configs[device] = config
            (home / "log").mkdir()
            self.agents[device] = ServiceProcess(config, home / "log")
        self.sim = Publisher(self.broker.host, self.broker.port)
        import socket

        deadline = time.monotonic() + 30
        while True:  # `hub view` listening
            assert self.view.poll() is None, (root / "view.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "hub view did not listen within 30s"
                time.sleep(0.1)

    @property
    def mqtt(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.sim.close()
        for agent in self.agents.values():
            agent.stop()
        self.view.terminate()
        code = self.view.wait(30)
        self.broker.stop()
        assert code == 0, (self.root / "view.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def view_fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    fleet = ViewFleet(tmp_path_factory.mktemp("fleet-view"))
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def browser() -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt install chromium)")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, view_fleet: ViewFleet) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(view_fleet.url + "/")
    page.wait_for_selector("body[data-live=yes]", timeout=30_000)
    yield page
    page.close()
    assert not errors, errors


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def row(page: Any, device: str) -> Any:
    return page.locator(f'tr[data-device="{device}"]')


def test_the_page_shows_real_agents_and_simulated_devices_with_their_state(view_fleet: ViewFleet, page: Any) -> None:
    from fleet_view_sim import CHAT, reported, state, telemetry, update

    sim = view_fleet.sim
    sim.send("sim-ok", "state", state("sim-ok", SIM_GROUP, True, {EMBED: "2"}))
    sim.send("sim-ok", "reported", reported("sim-ok", SIM_GROUP, {EMBED: ("2", "2")}))
    for k in range(2):
        sim.send("sim-ok", "telemetry", telemetry("sim-ok", SIM_GROUP, k + 1, time.time() - 5 + 5 * k, 500 * k,
                                                  power_w=7.4, temp_c=61.0, jpt=0.5))
    sim.send("sim-behind", "state", state("sim-behind", SIM_GROUP, True, {EMBED: "1"}))
    sim.send("sim-behind", "reported", reported("sim-behind", SIM_GROUP, {EMBED: ("2", "1")}, health="refused",
                                                code="signature", message="timestamp not signed by a threshold"))
    sim.send("sim-behind", "update", update("sim-behind", SIM_GROUP, EMBED, "2", "rejected", "signature",
                                            "timestamp not signed by a threshold"))
    for device in AGENTS:  # the real agents: online, their group, their model, their telemetry
        page.wait_for_selector(f'tr[data-device="{device}"][data-online=true] td.power:not(:text("\u2013"))',
                               timeout=120_000)
        assert row(page, device).locator("td.group").inner_text() == GROUP
        assert EMBED in row(page, device).locator("td.models").inner_text()
        assert row(page, device).locator("td.agent").inner_text() == "0.1.0"
    ok = row(page, "sim-ok")
    expect(ok.locator("td.temp")).to_have_text("61 °C")
    assert ok.locator("td.power").inner_text().startswith("7.4 W") and "measured" in ok.locator("td.power").inner_text()
    assert ok.locator("td.temp").inner_text() == "61 °C" and ok.locator("td.flags").inner_text() == "ok"
    assert "0.500 J" in ok.locator("td.jpt").inner_text() and CHAT in ok.locator("td.jpt").inner_text()
    behind = row(page, "sim-behind")
    expect(behind.locator("td.update")).to_contain_text("rejected")
    assert f"{EMBED}: 2 → 1" in behind.locator("td.models").inner_text()
    assert "signature: timestamp not signed by a threshold" in behind.locator("td.update").inner_text()
    assert "updates: refused" in behind.locator("td.update").inner_text()
    assert {"behind", "refused"} <= set(behind.get_attribute("data-problems").split())
    # filters: by problem and by group
    page.select_option("#f-problem", "refused")
    assert row(page, "sim-behind").is_visible() and not row(page, "sim-ok").is_visible()
    page.select_option("#f-problem", "")
    page.select_option("#f-group", SIM_GROUP)
    assert row(page, "sim-ok").is_visible() and not row(page, AGENTS[0]).is_visible()
    page.select_option("#f-group", "")
    # the device page: charts and the update job history
    page.goto(f"{view_fleet.url}/devices/press-1")
    # a line of two points or more (a steady power draws a flat line, which has no height to be "visible")
    page.wait_for_function("""() => {
        const line = document.querySelector('.chart[data-chart="power (W)"] polyline');
        return line !== null && line.getAttribute("points").trim().split(/\\s+/).length >= 2;
    }""", timeout=30_000)
    page.goto(f"{view_fleet.url}/devices/sim-behind")
    page.wait_for_selector("#jobs tbody tr")
    assert "rejected" in page.locator("#jobs tbody").inner_text()


def test_script_in_device_ids_and_refusal_texts_renders_as_text_and_junk_is_counted(
        view_fleet: ViewFleet, page: Any) -> None:
    from fleet_view_sim import reported, state

    sim = view_fleet.sim
    evil = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"
    sim = view_fleet.sim
    sim.send("sim-evil", "state", state("sim-evil", SIM_GROUP, True, {EMBED: "1"}))
    sim.send("sim-evil", "reported", reported("sim-evil", SIM_GROUP, {EMBED: ("2", "1")}, health="refused",
                                              code="signature", message=evil, agent_version=evil))
    before = int(page.locator("#skipped").get_attribute("data-count") or 0)
    evil_id = "<img src=x onerror=window.__xss=3>"  # one topic level: no "/" in it
    sim.raw(f"{PREFIX}/devices/{evil_id}/state", json.dumps(state(evil_id, SIM_GROUP)).encode(), retain=True)
    sim.raw(f"{PREFIX}/devices/sim-junk/reported", b"{not json")
    sim.raw(f"{PREFIX}/devices/sim-junk/telemetry", b'{"schema": "acme.metrics/9"}')
    sim.raw(f"{PREFIX}/devices/sim-junk/telemetry", b'{"schema": "edgefleet.telemetry/1", "x": "'
            + b"y" * 70_000 + b'"}')
    evil_row = row(page, "sim-evil")
    expect(evil_row.locator("td.update")).to_contain_text(evil)  # shown as the text it is
    assert evil_row.locator("td.agent").inner_text() == evil
    assert page.evaluate("window.__xss") is None
    assert page.locator("script:not([src])").count() == 0 and page.locator("img").count() == 0
    deadline = time.monotonic() + 20
    while int(page.locator("#skipped").get_attribute("data-count") or 0) < before + 4:
        assert time.monotonic() < deadline, page.locator("#skipped").inner_text()
        time.sleep(0.1)
    skipped = page.locator("#skipped").inner_text()
    assert all(word in skipped for word in ("unknown-device", "malformed", "not-ours", "too-large")), skipped
    page.locator("#skipped").click()  # the last skipped topic, as text
    expect(page.locator("#skipped-topic")).to_be_visible()
    assert page.evaluate("window.__xss") is None and page.locator("img").count() == 0
    assert "yyyy" not in page.content() and "not json" not in page.content()
    page.goto(f"{view_fleet.url}/devices/sim-evil")
    page.wait_for_selector("#device-title")
    assert evil in page.locator("td.update").inner_text() and page.evaluate("window.__xss") is None


def test_a_device_alert_shows_on_the_page_and_goes_when_it_resolves(view_fleet: ViewFleet, page: Any) -> None:
    """A real agent's disk alert fires (its rule is set below what the disk uses), reaches the
    page through the retained alert topic, and leaves it when the operator's reload resolves it."""
    import signal

    page.goto(view_fleet.url)
    flag = row(page, ALERTING).locator("td.flags .alerting")
    expect(flag).to_have_text("alert disk", timeout=60_000)
    expect(page.locator("header, #summary, body").first).to_contain_text("alerts firing")
    config = view_fleet.configs[ALERTING]
    text = config.read_text()
    config.write_text(text.replace(text[text.index("[alerts.disk]"):text.index("clear_for_s = 0") + 15],
                                   disk_rule(100.0).replace("resolve = 100.0", "resolve = 99.9").strip()))
    view_fleet.agents[ALERTING].signal(signal.SIGHUP)  # the alerts read the reloaded config
    expect(flag).to_have_count(0, timeout=60_000)


def test_a_killed_agent_turns_red_within_the_last_will_delay(view_fleet: ViewFleet, page: Any) -> None:
    device = AGENTS[1]
    page.wait_for_selector(f'tr[data-device="{device}"][data-online=true]', timeout=120_000)
    view_fleet.agents[device].proc.kill()  # SIGKILL: no goodbye, the broker sends the Last Will
    killed = time.monotonic()
    page.wait_for_selector(f'tr.offline[data-device="{device}"]', timeout=(KEEPALIVE_S * 1.5 + 10) * 1000)
    took = time.monotonic() - killed
    assert took <= KEEPALIVE_S * 1.5 + 10, took
    cell = row(page, device).locator("td.online")
    assert cell.inner_text().startswith("offline") and "connection lost" in cell.inner_text()
    color = cell.evaluate("e => getComputedStyle(e).color")
    assert color == "rgb(198, 40, 40)", color  # red
    page.select_option("#f-state", "offline")
    assert row(page, device).is_visible() and not row(page, AGENTS[0]).is_visible()


def test_a_rollout_advancing_shows_its_steps_counts_and_why_it_stopped(view_fleet: ViewFleet, page: Any) -> None:
    from security.desired import NAME_RE
    from sync.hub.rollouts.record import Plan, RolloutRecord
    from sync.hub.rollouts.topic import rollout_body, rollout_message, rollout_topic

    record = RolloutRecord(id="r-0a1b2c", group=SIM_GROUP, model=EMBED, from_version="1", to_version="2",
                           to_files={}, plan=Plan([10.0, 50.0, 100.0], 60.0, 0.1, 5, 600.0), salt="00aa",
                           serial=3, created_at=time.time(), step_started_at=time.time())
    assert NAME_RE.match(record.id)

    def publish() -> None:
        view_fleet.sim.raw(rollout_topic(PREFIX, record.id), rollout_message(rollout_body(record)), retain=True)

    record.counts = {"succeeded": 1, "pending": 2, "in_step": 3}
    publish()
    box = page.locator('[data-rollout="r-0a1b2c"]')
    box.wait_for()
    assert box.locator(".steps .current").inner_text() == "10%" and "running" in box.inner_text()
    assert box.locator(".counts").inner_text() == "3 devices in step: pending 2 · succeeded 1"
    record.step, record.counts = 1, {"succeeded": 10, "in_step": 10}
    record.history.append({"at": time.time(), "event": "step", "step": 2, "percent": 50.0, "serial": 4})
    publish()
    page.wait_for_selector('[data-rollout="r-0a1b2c"] .steps .current:text("50%")')
    record.state, record.reason = "aborted", "automatic abort: 2 of 12 devices failed (17% > 10%) at step 2 (50 %)"
    record.devices = {"sim-bad": {"outcome": "failed", "in_step": True, "active": "1", "code": "health-check"}}
    publish()
    page.wait_for_selector('[data-rollout="r-0a1b2c"][data-state=aborted]')
    assert "why it stopped: automatic abort: 2 of 12" in box.locator(".reason").inner_text()
    assert "sim-bad failed (health-check)" in box.locator(".failing").inner_text()


def test_a_broker_outage_shows_a_banner_and_the_page_recovers(view_fleet: ViewFleet, page: Any) -> None:
    from fleet_view_sim import Publisher, state

    banner = page.locator("#banner")
    assert banner.is_hidden()
    view_fleet.sim.close()
    view_fleet.broker.stop()
    banner.wait_for(state="visible", timeout=30_000)
    assert "unreachable" in banner.inner_text() and view_fleet.mqtt in banner.inner_text()
    assert "unreachable" in page.locator("#broker").inner_text()
    view_fleet.broker.start()
    banner.wait_for(state="hidden", timeout=60_000)
    assert "connected" in page.locator("#broker").inner_text()
    # and the page is live again: a device published after the outage appears
    view_fleet.sim = Publisher(view_fleet.broker.host, view_fleet.broker.port)
    view_fleet.sim.send("sim-after", "state", state("sim-after", SIM_GROUP, True, {EMBED: "2"}))
    row(page, "sim-after").wait_for(timeout=30_000)
