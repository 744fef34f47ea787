"""A real agent's /metrics before, during and after a known set of requests.

`exercise` sends what a user sends: a chat, a streamed chat (a long one, scraped while it
runs), an embedding, two KServe v2 gRPC calls through NVIDIA's tritonclient, a request
with a method the route does not take and one to a path that does not exist; every scrape is parsed
with prometheus_client's own text parser. Shared by tests/test_metrics_names.py (the
names and labels) and tests/test_prometheus_rules.py (promtool fed from these samples).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from agent_process import AgentProcess
from conftest import CHAT, EMBED
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: logit bias that keeps SmolLM2 from ending early: every generation runs to max_tokens
NO_EOS = {"0": -100, "2": -100}
#: tokens of the streamed chat: long enough to scrape /metrics while it runs
STREAM_TOKENS = 160
IDS = np.array([[101, 7592, 2088, 999, 102]], dtype=np.int64)


@dataclass
class Scrape:
    text: str
    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def series(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


@dataclass
class Traffic:
    before: Scrape
    #: while the streamed chat was generating (after its first text, before its end)
    during: Scrape
    after: Scrape
    #: HTTP requests sent between `before` and `after`, /metrics scrapes not counted
    http_requests: int
    #: gRPC calls sent: method -> count
    grpc_calls: dict[str, int]

    def delta(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


def scrape(agent: AgentProcess) -> Scrape:
    with urllib.request.urlopen(agent.url + "/metrics", timeout=30) as resp:
        return Scrape.parse(resp.read().decode())


def _post(agent: AgentProcess, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(agent.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())


def _status(agent: AgentProcess, path: str, method: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(agent.url + path, method=method), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def after_probes(agent: AgentProcess) -> Scrape:
    """A scrape once the start-up probes (one chat, one embedding) have ended: `serve` reports
    ready when the models are loaded, and probes them right after."""
    deadline = time.monotonic() + 120
    while True:
        now = scrape(agent)
        probed = [now.value("edgefleet_scheduler_completed_total", model=CHAT),
                  now.value("edgefleet_scheduler_completed_total", model=EMBED)]
        if "gen_ai_server_request_duration_seconds" in now.text:  # counted a moment after completion
            probed += [now.value("gen_ai_server_request_duration_seconds_count", model=CHAT, operation="chat"),
                       now.value("gen_ai_server_request_duration_seconds_count", model=EMBED, operation="embeddings")]
        if all(probed):
            return now
        assert time.monotonic() < deadline, "the start-up probes did not end"
        time.sleep(0.1)


def exercise(agent: AgentProcess) -> Traffic:
    before = after_probes(agent)
    chat = _post(agent, "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS})
    assert chat["usage"]["completion_tokens"] == 8  # type: ignore[index]
    request = urllib.request.Request(agent.url + "/v1/chat/completions", data=json.dumps({
        "model": CHAT, "messages": [{"role": "user", "content": "Count to two hundred."}], "stream": True,
        "max_tokens": STREAM_TOKENS, "temperature": 0, "logit_bias": NO_EOS}).encode(),
        headers={"Content-Type": "application/json"})
    during, last = None, b""
    with urllib.request.urlopen(request, timeout=300) as resp:
        for line in resp:
            if during is None and line.startswith(b"data: {") and b'"content"' in line:
                during = scrape(agent)  # the generation has 150-odd tokens to go
            last = line.strip() or last
        assert last == b"data: [DONE]"
    assert during is not None
    embedded = _post(agent, "/v1/embeddings", {"model": EMBED, "input": ["one text", "another text"]})
    assert len(embedded["data"]) == 2  # type: ignore[arg-type]
    assert _status(agent, "/v1/models", "DELETE") == 405
    assert _status(agent, "/no/such/path-4f1c2a", "GET") == 404
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        assert triton.is_server_live()
        feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "token_type_ids": np.zeros_like(IDS)}
        inputs = []
        for name, array in feeds.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        assert triton.infer(EMBED, inputs).as_numpy("last_hidden_state") is not None
    return Traffic(before, during, scrape(agent), http_requests=5,
                   grpc_calls={"ServerLive": 1, "ModelInfer": 1})
