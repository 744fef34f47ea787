"""/metrics under the names users' dashboards expect (issue 24, item 4).

One real agent (`edgefleet serve --demo`, its own process, so that NVIDIA's tritonclient
can talk gRPC to it) serves a chat, a long streamed chat, an embedding and two gRPC calls
(tests/metrics_traffic.py); every scrape is parsed with prometheus_client's text parser.
What a Prometheus user checks: gRPC calls are not HTTP requests; summing the per-model
energy counts nothing twice; no label carries free text (an error message, a request
path); the OpenTelemetry GenAI histograms count the requests
made; running / waiting and the KV cache show a generation while it runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from agent_process import serve
from conftest import CHAT, EMBED
from metrics_traffic import STREAM_TOKENS, Traffic, exercise

from runtime.registry import ModelState

HTTP = "edgefleet_http_requests_total"
GRPC = "grpc_server_handled_total"
GRPC_METHODS = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}
WORD = re.compile(r"^[A-Za-z0-9_.-]+$")

#: every label the agent exports, and the bounded set its values come from
BOUNDED: dict[str, Callable[[str], bool]] = {
    "route": lambda v: v == "unmatched" or re.fullmatch(r"(/[A-Za-z0-9_.{}-]+)+/?|/", v) is not None,
    "method": lambda v: v in {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
                              "measured", "estimated", "mixed", "unavailable"},
    "status": lambda v: re.fullmatch(r"[1-5]\d\d", v) is not None,
    "grpc_type": lambda v: v == "unary",
    "grpc_service": lambda v: v == "inference.GRPCInferenceService",
    "grpc_method": lambda v: v in GRPC_METHODS,
    "grpc_code": lambda v: v in {code.name for code in grpc.StatusCode},
    "model": lambda v: v in {CHAT, EMBED},
    "operation": lambda v: v in {"chat", "text_completion", "embeddings", "infer"},
    "state": lambda v: v in {s.value for s in ModelState} | {"total", "used", "available", "free"},
    "kind": lambda v: v in {"embedding", "tensor", "prompt", "completion"},
    # per API key (security/gate.py): the names in the keys file, never a secret
    "key": lambda v: re.fullmatch(r"(cert:)?[A-Za-z0-9][A-Za-z0-9._ -]{0,255}", v) is not None,
    "outcome": lambda v: v in {"ok", "denied", "rate_limited"},
    "cpu": lambda v: v == "all" or v.isdigit(),
    "period": lambda v: v in {"1m", "5m", "15m"},
    "sensor": lambda v: re.fullmatch(r"[\w ./-]+", v) is not None,  # the machine's sensor names
    "direction": lambda v: v in {"receive", "transmit"},
    "domain": lambda v: WORD.match(v) is not None,  # the machine's power domains
    "source": lambda v: v in {"rapl", "hwmon", "battery", "nvml", "estimate"},
    "used": lambda v: v in {"true", "false"},
    "reason": lambda v: v in {"ok", "absent", "permission_denied", "external_power", "unreadable", "error",
                              "missing", "malformed", "unknown", "revoked", "expired"},
    "part": lambda v: v in {"active", "idle"},
    "by": lambda v: v in {"models", "agent", "other"},
    "le": lambda v: not math.isnan(float(v)),
    # the device alerts' ALERTS-like gauge (agent/fleet/alerts.py): rule names from the config
    # edgefleet_model_tuned_info (runtime/tuning/): the settings a model was measured fastest with
    "kv_cache_type": lambda v: v in {"f16", "q8_0"},
    "flash_attn": lambda v: v in {"true", "false"},
    "prompt_chunk": str.isdigit, "threads": str.isdigit, "threads_batch": str.isdigit, "ubatch": str.isdigit,
    "rule": lambda v: WORD.match(v) is not None,
    "severity": lambda v: v in {"info", "warning", "critical"},
}


@pytest.fixture(scope="module")
def traffic(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    with serve(state_dir, tmp_path_factory.mktemp("metrics-names")) as agent:
        yield exercise(agent)


def test_grpc_calls_are_counted_apart_from_http_requests(traffic: Traffic) -> None:
    for sample in traffic.after.series(HTTP):
        assert "GRPCInferenceService" not in sample.labels["route"] and sample.labels["method"] != "gRPC", sample
    http = sum(s.value for s in traffic.after.series(HTTP) if s.labels["route"] != "/metrics") - sum(
        s.value for s in traffic.before.series(HTTP) if s.labels["route"] != "/metrics")
    assert http == traffic.http_requests
    for method, calls in traffic.grpc_calls.items():
        assert traffic.delta(GRPC, grpc_method=method, grpc_code="OK", grpc_type="unary",
                             grpc_service="inference.GRPCInferenceService") == calls
        assert traffic.delta("grpc_server_handling_seconds_count", grpc_method=method) == calls
    assert not [s for s in traffic.after.series("edgefleet_http_request_duration_seconds_count")
                if "GRPCInferenceService" in s.labels["route"]]


def test_model_energy_parts_add_up_without_double_counting(traffic: Traffic) -> None:
    after = traffic.after
    family = after.series("edgefleet_model_energy_joules_total")
    assert family and all(set(s.labels) == {"model", "part", "method"} for s in family)
    # What docs/api.md promises: the active parts of all models are the active energy billed
    # to models; their idle parts are within the device's idle baseline; each model's parts
    # add up to what the device drew while serving it, so sum() counts every joule once.
    assert after.value("edgefleet_model_energy_joules_total", part="active") == pytest.approx(
        after.value("edgefleet_active_energy_joules_total", by="models"), rel=1e-9, abs=1e-9)
    assert after.value("edgefleet_model_energy_joules_total", part="idle") <= after.value(
        "edgefleet_host_energy_joules_total", part="idle") + 1e-9
    assert after.value("edgefleet_model_energy_joules_total") <= after.value("edgefleet_energy_joules_total") + 1e-9
    assert after.value("edgefleet_model_energy_joules_total", model=CHAT) > 0


def test_every_label_value_comes_from_a_bounded_set(traffic: Traffic) -> None:
    for scrape in (traffic.before, traffic.during, traffic.after):
        for sample in scrape.samples:
            for label, value in sample.labels.items():
                assert label in BOUNDED, f"{sample.name}: label {label!r} has no bounded set in this test"
                assert BOUNDED[label](value), f"{sample.name}: {label}={value!r} is not from a bounded set"
    assert "4f1c2a" not in traffic.after.text  # the request path of a 404 is not a label
    assert traffic.delta(HTTP, route="unmatched", status="404") == 1


def test_genai_histograms_count_the_requests_made(traffic: Traffic) -> None:
    delta = traffic.delta
    assert delta("gen_ai_server_request_duration_seconds_count", model=CHAT, operation="chat") == 2
    assert delta("gen_ai_server_request_duration_seconds_count", model=EMBED, operation="embeddings") == 1
    assert delta("gen_ai_server_request_duration_seconds_count", model=EMBED, operation="infer") == 1
    assert delta("gen_ai_server_request_duration_seconds_count") == 4
    assert delta("gen_ai_server_time_to_first_token_seconds_count", model=CHAT) == 2
    assert delta("gen_ai_server_time_per_output_token_seconds_count", model=CHAT) == 2
    assert delta("gen_ai_server_time_per_output_token_seconds_count", model=EMBED) == 0
    # cumulative buckets end at +Inf with the count; sums are seconds spent
    after = traffic.after
    for name in ("gen_ai_server_request_duration_seconds", "gen_ai_server_time_per_output_token_seconds",
                 "gen_ai_server_time_to_first_token_seconds"):
        assert after.value(f"{name}_bucket", model=CHAT, le="+Inf") == after.value(f"{name}_count", model=CHAT)
    chat_s = delta("gen_ai_server_request_duration_seconds_sum", model=CHAT)
    ttft_s = delta("gen_ai_server_time_to_first_token_seconds_sum", model=CHAT)
    tpot_s = delta("gen_ai_server_time_per_output_token_seconds_sum", model=CHAT)
    assert 0 < ttft_s < chat_s and tpot_s > 0
    # each chat's (end - first text) / (tokens - 1), times its tokens - 1 (at least 7), is
    # within its own duration
    assert tpot_s * 7 <= chat_s
    assert delta("edgefleet_generated_tokens_total", model=CHAT) == 8 + STREAM_TOKENS
    assert "edgefleet_time_to_first_token_seconds_count" not in after.names()  # renamed, no duplicate


def test_running_waiting_and_kv_cache_show_a_generation(traffic: Traffic) -> None:
    during, after = traffic.during, traffic.after
    assert during.value("edgefleet_requests_running", model=CHAT) == 1
    assert during.value("edgefleet_requests_waiting", model=CHAT) == 0
    assert during.value("edgefleet_queue_depth", model=CHAT) == 1
    assert 0 < during.value("edgefleet_kv_cache_usage_ratio", model=CHAT) <= 1
    assert after.value("edgefleet_requests_running", model=CHAT) == 0
    assert after.value("edgefleet_requests_waiting", model=CHAT) == 0
    # the prefix cache keeps the last conversations' cells, as llama-server counts them
    assert 0 < after.value("edgefleet_kv_cache_usage_ratio", model=CHAT) <= 1
    assert {s.labels["model"] for s in after.series("edgefleet_kv_cache_usage_ratio")} == {CHAT}  # ONNX: none
    assert {s.labels["model"] for s in after.series("edgefleet_requests_running")} == {CHAT, EMBED}
