"""The shipped Prometheus rules and Grafana dashboard against a real agent (issue 24, item 3).

packaging/prometheus/edgefleet-rules.yml is checked and unit-tested by Debian's `promtool`
(package `prometheus`); the unit tests' input series are the samples of a real agent's
/metrics (tests/metrics_traffic.py: `serve --demo` connected to a real mosquitto, after a
chat, a streamed chat, an embedding and gRPC calls), written as promtool's
`input_series` with their real names and labels, and only the values a scenario needs
changed (a 500 beside the real 200s, a failed model, a full disk). Every PromQL
expression of the rules and of packaging/grafana/edgefleet-dashboard.json is parsed with
promql-parser and each metric it reads must be one that agent exports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from agent_process import serve
from conftest import CHAT
from metrics_traffic import Traffic, exercise
from mqtt_broker import MosquittoBroker
from prometheus_client.samples import Sample

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "packaging" / "prometheus" / "edgefleet-rules.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "edgefleet-dashboard.json"
PROMTOOL = shutil.which("promtool")
INSTANCE = {"instance": "edge-1:8080", "job": "edgefleet"}
#: made by Prometheus itself, not by an exporter
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
#: exported only on some machines, with why; used by the rules all the same
CONDITIONAL = {"edgefleet_temperature_celsius": "only where the machine has temperature sensors"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt install prometheus; "
                                "scripts/setup.sh --test installs it)")


@pytest.fixture(scope="module")
def traffic(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    work = tmp_path_factory.mktemp("prometheus-rules")
    broker = MosquittoBroker(work)
    broker.start()
    try:
        with serve(state_dir, work, mqtt__host=broker.host, mqtt__port=broker.port,
                   mqtt__device_id="edge-1") as agent:
            yield exercise(agent)
    finally:
        broker.stop()


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], check=False, capture_output=True, text=True, timeout=120)


# ---- PromQL: which metrics the shipped files read ---------------------------------------

def rule_expressions() -> dict[str, str]:
    """Every rule's expression, by its record or alert name."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule.get("record") or rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    """Every panel target's expression and every query variable's metric, by where it is."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<series selector>, <label>)
            query = variable["query"]["query"]
            assert query.startswith("label_values(") and query.endswith(")"), query
            found[f"variable ${variable['name']}"] = query[len("label_values("):query.rindex(",")]
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads, from Prometheus's grammar (promql-parser)."""
    import promql_parser

    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)

    def walk(node: Any) -> Iterator[str]:
        if type(node).__name__ == "VectorSelector":
            assert node.name, f"a selector without a metric name in {expr}"
            yield node.name
            return
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                yield from walk(child)
        for arg in getattr(node, "args", None) or []:
            yield from walk(arg)

    return set(walk(promql_parser.parse(expr)))


def test_metric_names_are_parsed_from_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x=~"$model"}[$__rate_interval])))'
                        ' / ignoring(state) b{state="total"} > 1 or absent(up{job="e"})') == {"a_bucket", "b", "up"}


def test_every_metric_the_rules_and_dashboard_read_is_exported(traffic: Traffic) -> None:
    exported = traffic.after.names()
    recorded = {name for name in rule_expressions() if ":" in name}
    documented = (REPO / "docs" / "api.md").read_text()
    unknown = {}
    for where, expr in {**rule_expressions(), **dashboard_expressions()}.items():
        for name in metric_names(expr) - exported - recorded - PROMETHEUS_OWN:
            if name in CONDITIONAL and name in documented and not psutil.sensors_temperatures():
                continue  # this machine has no sensor; the name is the documented one
            unknown[where] = name
    assert not unknown, f"metrics the agent does not export: {unknown}"
    used = set().union(*(metric_names(e) for e in dashboard_expressions().values()))
    for wanted in ("edgefleet_generated_tokens_total", "gen_ai_server_time_to_first_token_seconds_bucket",
                   "gen_ai_server_request_duration_seconds_bucket",
                   "gen_ai_server_time_per_output_token_seconds_bucket",
                   "edgefleet_requests_running", "edgefleet_requests_waiting", "edgefleet_kv_cache_usage_ratio",
                   "edgefleet_host_power_watts", "edgefleet_model_energy_joules_total", "edgefleet_system_memory_bytes",
                   "edgefleet_temperature_celsius", "edgefleet_http_requests_total"):
        assert wanted in used, f"the dashboard shows no {wanted}"


def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:  # what an on-call person reads, and for how long it must hold
                assert rule["for"] and rule["labels"] and {"summary", "description"} <= set(rule["annotations"])


# ---- promtool test rules, fed by the real agent's series -------------------------------

def selector(name: str, labels: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return name + "{" + ",".join(f"{k}={quoted(v)}" for k, v in sorted(labels.items())) + "}"


def values(start: float, per_minute: float = 0.0, minutes: int = 40) -> str:
    return f"{start:.6f}+{per_minute:.6f}x{minutes}"


def one(samples: list[Sample], **labels: str) -> Sample:
    """The real sample with these labels (its name and every other label are the agent's)."""
    found = [s for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, found)
    return found[0]


class Series:
    """promtool input series: the real samples of one scrape, constant, plus overrides."""

    def __init__(self, traffic: Traffic) -> None:
        self.real = [s for s in traffic.after.samples if not s.name.endswith("_created")]
        self.values: dict[str, str] = {}
        for sample in self.real:
            self.set(sample.name, sample.labels, values(sample.value))

    def set(self, name: str, labels: dict[str, str], series_values: str) -> dict[str, str]:
        full = {**INSTANCE, **labels}
        self.values[selector(name, full)] = series_values
        return full

    def drop(self, name: str) -> None:
        self.values = {k: v for k, v in self.values.items() if not k.startswith(name + "{")}

    def input_series(self) -> list[dict[str, str]]:
        return [{"series": k, "values": v} for k, v in self.values.items()]


def alert_names() -> list[str]:
    return [name for name in rule_expressions() if ":" not in name]


def run_promtool_tests(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    """promtool test rules on `tests`, against the shipped rules less their annotations: promtool
    compares annotations too, and theirs render $value (`promtool check rules` checks them)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    spec = tmp_path / "edgefleet-rules.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))
    tested = promtool("test", "rules", spec)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_healthy_agents_series_fire_no_alert(traffic: Traffic, tmp_path: Path) -> None:
    series = Series(traffic)
    series.set("up", {}, values(1))
    # what this machine's own state might make fire is set to healthy values, on its real series
    for name, states in (("edgefleet_system_memory_bytes", ("available", "used")),
                         ("edgefleet_state_dir_disk_bytes", ("used", "free"))):
        size = one([s for s in series.real if s.name == name], state="total").value
        for state in states:
            series.set(name, {"state": state}, values(size / 2))
    for sample in series.real:
        if sample.name in ("edgefleet_temperature_celsius", "edgefleet_alert_firing"):
            series.set(sample.name, sample.labels, values(50 if "temperature" in sample.name else 0))
    # the real counters grow at the pace the traffic made them grow, every minute
    for sample in series.real:
        if sample.name.endswith("_total") and not sample.name.startswith("gen_ai"):
            grew = traffic.delta(sample.name, **sample.labels)
            series.set(sample.name, sample.labels, values(sample.value, max(grew, 0.0)))
    assert any("/readyz" in key and 'status="503"' in key for key in series.values), \
        "the real agent answered /readyz 503 while loading: that is not an API error"
    run_promtool_tests(tmp_path, [{
        "interval": "1m", "input_series": series.input_series(),
        "alert_rule_test": [{"eval_time": "30m", "alertname": name, "exp_alerts": []} for name in alert_names()],
    }])


def test_each_alert_fires_on_the_real_series_it_watches(traffic: Traffic, tmp_path: Path) -> None:
    series = Series(traffic)
    real = series.real
    expected: dict[str, list[dict[str, str]]] = {}
    series.set("up", {}, values(1))
    down = series.set("up", {"instance": "edge-2:8080"}, values(0))
    expected["EdgefleetAgentDown"] = [{**down, "severity": "critical"}]
    # 5xx: the real chat requests' series at 60 a minute, and the same route answering 500 at 10
    chat = one([s for s in real if s.name == "edgefleet_http_requests_total"],
               route="/v1/chat/completions", status="200")
    series.set(chat.name, chat.labels, values(chat.value, 60))
    series.set(chat.name, {**chat.labels, "status": "500"}, values(0, 10))
    expected["EdgefleetHigh5xxRatio"] = [{"instance": INSTANCE["instance"], "severity": "warning"}]
    # time to first token: the chat model's real buckets, every request past 10 s
    for bucket in [s for s in real if s.name == "gen_ai_server_time_to_first_token_seconds_bucket"]:
        late = bucket.labels["model"] == CHAT and float(bucket.labels["le"]) > 10
        series.set(bucket.name, bucket.labels, values(bucket.value, 10 if late else 0))
    expected["EdgefleetTimeToFirstTokenHigh"] = [{"instance": INSTANCE["instance"], "model": CHAT,
                                                  "severity": "warning"}]
    # the chat model failed (its real series, in state failed)
    loaded = one([s for s in real if s.name == "edgefleet_model_loaded"], model=CHAT)
    series.drop("edgefleet_model_loaded")
    failed = series.set(loaded.name, {**loaded.labels, "state": "failed"}, values(0))
    expected["EdgefleetModelNotReady"] = [{**failed, "severity": "critical"}]
    # memory and disk 95 % used, with this machine's real totals
    for name, alert in (("edgefleet_system_memory_bytes", "EdgefleetMemoryNearlyFull"),
                        ("edgefleet_state_dir_disk_bytes", "EdgefleetDiskNearlyFull")):
        size = one([s for s in real if s.name == name], state="total").value
        left = "available" if name == "edgefleet_system_memory_bytes" else "free"
        series.set(name, {"state": "used"}, values(size * 0.95))
        series.set(name, {"state": left}, values(size * 0.05))
        expected[alert] = [{**INSTANCE, "severity": "warning"}]
    # a sensor at 90 °C: this machine's own sensor where it has one
    sensors = [s for s in real if s.name == "edgefleet_temperature_celsius"]
    hot = series.set("edgefleet_temperature_celsius", sensors[0].labels if sensors else {"sensor": "cpu_thermal/0"},
                     values(90))
    expected["EdgefleetTemperatureHigh"] = [{**hot, "severity": "warning"}]
    # the telemetry outbox drops a record a minute (its real series: the agent runs with MQTT)
    dropped = one([s for s in real if s.name == "edgefleet_telemetry_outbox_dropped_total"])
    series.set(dropped.name, dropped.labels, values(dropped.value, 1))
    expected["EdgefleetOutboxDropping"] = [{**INSTANCE, "severity": "warning"}]
    # the energy source in use stops answering
    source = one([s for s in real if s.name == "edgefleet_energy_source_up"], used="true")
    series.drop(source.name)
    lost = series.set(source.name, {**source.labels, "reason": "unreadable"}, values(0))
    expected["EdgefleetEnergySourceLost"] = [{**lost, "severity": "warning"}]
    # one of the device's own alert rules fires
    device = [s for s in real if s.name == "edgefleet_alert_firing"]
    if device:
        firing = series.set(device[0].name, device[0].labels, values(1))
        expected["EdgefleetDeviceAlertFiring"] = [{**firing, "origin": "device"}]
    tests = [{
        "interval": "1m", "input_series": series.input_series(),
        "alert_rule_test": [{"eval_time": "30m", "alertname": name,
                             "exp_alerts": [{"exp_labels": labels} for labels in expected.get(name, [])]}
                            for name in alert_names() if name != "EdgefleetScrapeAbsent"],
        # the recorded ratio: 10 of 70 requests a minute (rounded: promtool compares every bit)
        "promql_expr_test": [{"expr": "round(instance:edgefleet_http_5xx:ratio_rate5m * 7000)", "eval_time": "30m",
                              "exp_samples": [{"labels": selector("", {"instance": INSTANCE["instance"]}),
                                               "value": 1000}]}],
    }, {
        "interval": "1m", "input_series": [],  # no target at all
        "alert_rule_test": [{"eval_time": "15m", "alertname": "EdgefleetScrapeAbsent",
                             "exp_alerts": [{"exp_labels": {"job": "edgefleet", "severity": "warning"}}]}],
    }]
    assert set(expected) >= set(alert_names()) - {"EdgefleetScrapeAbsent", "EdgefleetDeviceAlertFiring"}
    run_promtool_tests(tmp_path, tests)
