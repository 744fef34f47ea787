"""Continuous batching of a GGUF chat model: several requests decode together, and each
still gets the answer it gets alone.

Every check sends its requests alone first, then together, through real HTTP to an agent
in this process (real model, real scheduler). What batching may change is the shape of
the decode calls a token's logits come from (one row alone, up to eight rows together).
The engine measures at load whether llama.cpp's kernels give a row the same bits whatever
the row count (on this project's AVX2 machine they do: measured after real prompts too,
max difference 0.0 for 2, 3, 4 and 8 rows); where they do not, it decodes greedy and
seeded sequences one per call. Either way the text under load must equal the text alone,
so equality is asserted; the tests whose outcome rests on the CPU's kernels record the
CPU path they ran on (`cpu_path`), and one forces the one-per-call path to check it too.

Timing is asserted only as "does not stall for seconds", with bounds that grow with how
slow the machine is at that moment (the test machine is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import CHAT, Executions, RunningAgent, demo_config, start_agent

from agent.config import LimitsConfig, SchedulerConfig
from agent.context import MODELS
from runtime.scheduling.batching import BatchingSettings

pytestmark = pytest.mark.slow

#: SmolLM2's end-of-generation tokens; banned where a request must run to max_tokens.
NO_EOG = {"logit_bias": {"0": -100, "2": -100, "4": -100}}

SYSTEM = ("You are the assistant of a fleet of edge devices. Answer in one or two sentences, name the "
          "device, and say what to check first. ") * 6  # a few prompt chunks long

#: Eight distinct prompts: chat and plain completion, short and several chunks long.
PROMPTS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Name three colours."}]},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Device 7 reports a fan error. What now?"}]},
    {"prompt": "The three laws of thermodynamics are"},
    {"messages": [{"role": "user", "content": "Write a haiku about a lighthouse."}]},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Device 9 lost its network. What now?"}]},
    {"prompt": "A short history of the bicycle: in 1817,"},
    {"messages": [{"role": "user", "content": "Explain what a heat pump does, briefly."}]},
]
WORDS = ["temperature", "vibration", "humidity", "voltage", "pressure"]
GREEDY = {"max_tokens": 48, "temperature": 0}
SEEDED = {"max_tokens": 24, "temperature": 0.8, "seed": 42, **NO_EOG}


class Answer:
    """One request, streamed or not, with when each piece of text arrived. Started at once;
    `await answer.done()`. A streamed one leaves (closes its connection) after `leave_after`
    pieces or when `leave()` is called."""

    def __init__(self, agent: RunningAgent, prompt: dict[str, Any], settings: dict[str, Any],
                 stream: bool = False, leave_after: int | None = None) -> None:
        self.chat = "messages" in prompt
        self.path = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.body = {"model": CHAT, **prompt, **settings}
        self.stream = stream
        self.status: int | None = None
        self.pieces: list[str] = []
        self.arrivals: list[float] = []
        self.usage: dict[str, int] | None = None
        self.finish: str | None = None
        self.error: dict[str, Any] | None = None
        self.sent_at = time.monotonic()
        self.ended_at: float | None = None
        self.left_at: float | None = None
        self._leave_after = leave_after
        self._leave = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(agent))

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def outcome(self) -> tuple[str, dict[str, int] | None, str | None]:
        return self.text, self.usage, self.finish

    def leave(self) -> None:
        self._leave.set()

    async def abandon(self) -> None:
        """Hang up at once, even before the response has begun."""
        self.left_at = time.monotonic()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def done(self) -> Answer:
        await self._task
        return self

    async def pieces_at_least(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.pieces) < n:
            assert not self._task.done(), f"ended after {len(self.pieces)} pieces: {self.error or self.finish}"
            assert time.monotonic() < deadline, f"only {len(self.pieces)} pieces after {timeout}s"
            await asyncio.sleep(0.02)

    async def _run(self, agent: RunningAgent) -> None:
        body = self.body
        if self.stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        # Its own session: leaving closes this client's connection and nobody else's.
        async with aiohttp.ClientSession() as session, session.post(agent.url + self.path, json=body) as resp:
            self.status = resp.status
            if resp.status != 200:
                self.error = (await resp.json())["error"]
            elif not self.stream:
                reply = await resp.json()
                choice = reply["choices"][0]
                self._piece(choice["message"]["content"] if self.chat else choice["text"])
                self.usage, self.finish = reply["usage"], choice["finish_reason"]
            else:
                await self._read_stream(resp)
        self.ended_at = time.monotonic()

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> None:
        lines = aiter(resp.content)
        while True:
            if self._leave.is_set() or (self._leave_after is not None and len(self.pieces) >= self._leave_after):
                self.left_at = time.monotonic()
                return
            next_line = asyncio.ensure_future(anext(lines, None))
            leave = asyncio.ensure_future(self._leave.wait())
            await asyncio.wait([next_line, leave], return_when=asyncio.FIRST_COMPLETED)
            leave.cancel()
            if not next_line.done():
                next_line.cancel()
                continue
            line = next_line.result()
            if line is None:
                return
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            self.usage = chunk.get("usage") or self.usage
            for choice in chunk["choices"]:
                self._piece((choice["delta"].get("content") if self.chat else choice["text"]) or "")
                self.finish = choice["finish_reason"] or self.finish

    def _piece(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            self.arrivals.append(time.monotonic())


async def alone(agent: RunningAgent, prompt: dict[str, Any], settings: dict[str, Any],
                stream: bool = False) -> tuple[str, dict[str, int] | None, str | None]:
    answer = await Answer(agent, prompt, settings, stream).done()
    assert answer.status == 200, answer.error
    return answer.outcome


async def together(agent: RunningAgent, prompts: list[dict[str, Any]], settings: dict[str, Any],
                   stream: bool | list[bool] = False) -> list[Answer]:
    streams = stream if isinstance(stream, list) else [stream] * len(prompts)
    answers = [Answer(agent, p, settings, s) for p, s in zip(prompts, streams, strict=True)]
    for answer in answers:
        await answer.done()
        assert answer.status == 200, answer.error
    return answers


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_same_as_alone(got: Answer, want: tuple[str, dict[str, int] | None, str | None], what: str) -> None:
    """Equal text, usage and finish_reason."""
    assert got.outcome == want, (
        f"{what}: under load differs from alone after {common_prefix(got.text, want[0])} characters\n"
        f"  alone: {want}\n  load:  {got.outcome}")


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def idle(agent: RunningAgent) -> None:
    """Until nothing is queued or running (clients that left earlier are settled)."""

    async def empty() -> bool:
        return await agent.metric("edgefleet_queue_depth", model=CHAT) == 0

    await wait_for(empty, timeout=120)


def chat_agent(state_dir: Path, batching: BatchingSettings, max_pending: int = 32,
               limits: LimitsConfig | None = None) -> Any:
    config = demo_config(state_dir, (CHAT,))
    return start_agent(replace(config, batching=batching, scheduler=SchedulerConfig(max_pending=max_pending),
                               limits=limits or LimitsConfig()))


@pytest.fixture(scope="module")
async def batched(state_dir: Path) -> AsyncIterator[RunningAgent]:
    """The default [batching] settings: 8 slots on a CPU."""
    async with chat_agent(state_dir, BatchingSettings()) as running:
        yield running


@pytest.fixture(scope="module")
async def greedy_alone(batched: RunningAgent) -> list[tuple[str, dict[str, int] | None, str | None]]:
    return [await alone(batched, prompt, GREEDY) for prompt in PROMPTS]


# --- the same answers under load -------------------------------------------------


@pytest.mark.cpu_path
async def test_greedy_answers_under_4_and_8_way_concurrency_equal_the_answers_alone(batched, greedy_alone):
    four = await together(batched, PROMPTS[:4], GREEDY)
    for i, answer in enumerate(four):
        assert_same_as_alone(answer, greedy_alone[i], f"prompt {i} of 4")
    async with Executions(batched, CHAT) as decodes:
        eight = await together(batched, PROMPTS, GREEDY, stream=[i % 2 == 0 for i in range(8)])
    for i, answer in enumerate(eight):
        assert_same_as_alone(answer, greedy_alone[i], f"prompt {i} of 8")
    assert all(text for text, _, _ in greedy_alone)
    if batched.app[MODELS].get(CHAT).backend.engine.rows_independent:
        # And they were decoded together: several sequences per llama_decode on average.
        assert decodes.executed / decodes.executions > 3, (
            f"{decodes.executed:.0f} tokens in {decodes.executions:.0f} decode calls")
    else:  # this CPU's kernels make a row depend on its batch: greedy rows go one per call
        assert decodes.executed == decodes.executions, (
            f"{decodes.executed:.0f} tokens in {decodes.executions:.0f} decode calls")


@pytest.mark.cpu_path
async def test_where_rows_depend_on_the_batch_repeatable_requests_decode_alone_with_the_same_answers(
        batched, greedy_alone):
    """The engine's other path, for machines whose kernels make a row depend on the batch
    (it measures this at load; this CPU is not one): greedy and seeded sequences get a decode
    call each, sampled ones without a seed share one. Forced here on a live agent."""
    engine = batched.app[MODELS].get(CHAT).backend.engine
    measured, engine.rows_independent = engine.rows_independent, False
    try:
        async with Executions(batched, CHAT) as decodes:
            greedy = await together(batched, PROMPTS[:4], GREEDY)
        assert decodes.executed == decodes.executions, "greedy sequences must be decoded one per call"
        unseeded = {k: v for k, v in SEEDED.items() if k != "seed"}
        async with Executions(batched, CHAT) as decodes:
            answers = [Answer(batched, p, GREEDY) for p in PROMPTS[4:6]] + \
                      [Answer(batched, p, unseeded) for p in PROMPTS[:2]]
            for answer in answers:
                await answer.done()
        assert decodes.executed > decodes.executions, "sampled sequences without a seed still share calls"
    finally:
        engine.rows_independent = measured
    for i, answer in enumerate(greedy + answers[:2]):
        assert_same_as_alone(answer, greedy_alone[i], f"prompt {i}, one decode call each")
    assert all(a.usage["completion_tokens"] == SEEDED["max_tokens"] for a in answers[2:])


@pytest.mark.cpu_path
async def test_seeded_sampling_repeats_alone_and_under_load_streamed_or_not(batched):
    prompts = PROMPTS[:4]
    first = [await alone(batched, p, SEEDED) for p in prompts]
    for i, (text, usage, finish) in enumerate(first):
        assert text and finish == "length", (i, finish)
        assert usage["completion_tokens"] == SEEDED["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for i, p in enumerate(prompts):
        assert await alone(batched, p, SEEDED, stream=True) == first[i], f"prompt {i} streamed alone"
    # Each prompt twice at once, once streamed and once not: eight requests in eight slots.
    answers = await together(batched, prompts * 2, SEEDED, stream=[False] * 4 + [True] * 4)
    for i, answer in enumerate(answers):
        assert_same_as_alone(answer, first[i % 4], f"prompt {i % 4} under load")
    # They decoded together: every stream had its first piece before anyone had finished.
    assert max(a.arrivals[0] for a in answers[4:]) < min(a.ended_at for a in answers)


async def test_sampling_without_a_seed_still_differs_between_requests(batched):
    """The seeded requests above repeat because of their seed, not because every slot draws
    the same numbers."""
    settings = {k: v for k, v in SEEDED.items() if k != "seed"} | {"temperature": 1.2}
    answers = await together(batched, [PROMPTS[2]] * 4, settings)
    assert len({a.text for a in answers}) > 1, [a.text for a in answers]


async def test_a_bad_request_in_the_batch_gets_its_own_error(batched, greedy_alone):
    bad = Answer(batched, {"prompt": [1, 2, 10_000_000]}, GREEDY)
    answers = [Answer(batched, p, GREEDY) for p in PROMPTS[:3]]
    too_long = Answer(batched, {"prompt": "word " * 3000}, GREEDY)
    for answer in [bad, too_long, *answers]:
        await answer.done()
    assert bad.status == 400 and bad.error["param"] == "prompt", bad.error
    assert too_long.status == 400 and too_long.error["code"] == "context_length_exceeded", too_long.error
    for i, answer in enumerate(answers):
        assert_same_as_alone(answer, greedy_alone[i], f"prompt {i} beside bad requests")


# --- leaving, joining, waiting ---------------------------------------------------------


@pytest.mark.cpu_path
async def test_a_client_leaving_mid_batch_changes_nobody_else_and_frees_its_slot(batched):
    settings = {**GREEDY, **NO_EOG}
    prompts = PROMPTS[4:8]
    want = [await alone(batched, p, settings) for p in prompts]
    await idle(batched)
    cancelled = await batched.metric("edgefleet_scheduler_cancelled_total", model=CHAT)
    answers = [Answer(batched, p, settings, stream=True, leave_after=3 if i == 2 else None)
               for i, p in enumerate(prompts)]
    for answer in answers:
        await answer.done()
    leaver = answers.pop(2)
    assert leaver.left_at is not None
    assert want[2][0].startswith(leaver.text), (leaver.text, want[2][0])
    assert all(a.ended_at > leaver.left_at for a in answers), "the others must still be running when it leaves"
    for answer, expected, i in zip(answers, want[:2] + want[3:], (0, 1, 3), strict=True):
        assert_same_as_alone(answer, expected, f"stream {i}")

    async def counted() -> bool:
        return await batched.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == cancelled + 1

    await wait_for(counted)
    assert await batched.metric("edgefleet_queue_depth", model=CHAT) == 0
    assert await alone(batched, prompts[2], settings) == want[2]


async def test_a_long_prompt_joining_does_not_stall_the_running_streams(batched):
    """A newcomer's ~1,000-token prompt is read in pieces between decode steps: the streams
    already running keep getting tokens while it is read. Without that they would wait the
    whole prompt (seconds on a small CPU)."""
    settings = {"max_tokens": 1000, "temperature": 0.8, **NO_EOG}
    streams = [Answer(batched, p, settings, stream=True) for p in PROMPTS[:3]]
    for stream in streams:
        await stream.pieces_at_least(3)
    log = "".join(f"{t:02d}:00 device {t * 7 % 31} reported {WORDS[t % 5]} readings, all within range.\n"
                  for t in range(60))
    newcomer = Answer(batched, {"prompt": log + "Summary of the log:"}, {"max_tokens": 4, "temperature": 0},
                      stream=True)
    await newcomer.pieces_at_least(1, timeout=300)
    started, first = newcomer.sent_at, newcomer.arrivals[0]
    for stream in streams:
        stream.leave()
    await newcomer.done()
    for stream in streams:
        await stream.done()
    await idle(batched)
    assert 900 <= newcomer.usage["prompt_tokens"] <= 1200, newcomer.usage
    reading = first - started
    bound = max(3.0, reading / 3)
    for i, stream in enumerate(streams):
        during = [t for t in stream.arrivals if started <= t <= first]
        marks = [started, *during, first]
        gap = max(b - a for a, b in itertools.pairwise(marks))
        assert len(during) >= 2, f"stream {i} got {len(during)} pieces during the {reading:.1f}s prompt"
        assert gap < bound, f"stream {i} waited {gap:.1f}s (the prompt took {reading:.1f}s)"


async def test_a_prompt_cut_short_by_its_client_leaves_a_slot_the_next_request_reads_right(batched, two_slots):
    """A client that hangs up while its long prompt is being read leaves part of it in a
    slot's cache. The next request with that prompt reuses the part and must answer as a
    fresh agent does (`two_slots` has never seen this prompt)."""
    manual = "".join(f"Step {i}: open panel {i % 7}, check the {WORDS[i % 5]} gauge, note it, close it.\n"
                     for i in range(36))
    prompt = {"messages": [{"role": "system", "content": manual},
                           {"role": "user", "content": "Which step checks panel 3 first?"}]}
    settings = {"max_tokens": 16, "temperature": 0}
    await idle(batched)
    cancelled = await batched.metric("edgefleet_scheduler_cancelled_total", model=CHAT)
    cut = Answer(batched, prompt, settings, stream=True)

    async def admitted() -> bool:
        return await batched.metric("edgefleet_queue_depth", model=CHAT) == 1

    await wait_for(admitted)
    await asyncio.sleep(0.5)  # a few of its ~13 prompt chunks
    await cut.abandon()

    async def counted() -> bool:
        return await batched.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == cancelled + 1

    await wait_for(counted, timeout=120)
    cached = await batched.metric("edgefleet_prompt_tokens_cached_total", model=CHAT)
    again = await alone(batched, prompt, settings)
    assert await batched.metric("edgefleet_prompt_tokens_cached_total", model=CHAT) > cached, \
        "nothing of the first prompt was read before its client left, or the next request reused none of it"
    assert again == await alone(two_slots, prompt, settings)


# --- two slots: the freed slot, and overload ------------------------------------------


@pytest.fixture(scope="module")
async def two_slots(state_dir: Path) -> AsyncIterator[RunningAgent]:
    """gguf_slots=2 and room for one more request in the queue."""
    async with chat_agent(state_dir, BatchingSettings(gguf_slots=2), max_pending=3) as running:
        yield running


async def test_a_queued_request_starts_as_soon_as_a_client_hangs_up(two_slots):
    agent = two_slots
    short = {"max_tokens": 8, "temperature": 0}
    want = await alone(agent, PROMPTS[0], short)
    await idle(agent)
    cancelled = await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT)
    long = {"max_tokens": 1500, "temperature": 0.8, **NO_EOG}
    a = Answer(agent, {"prompt": "A long story about the sea:"}, long, stream=True)
    b = Answer(agent, {"prompt": "A long story about the mountains:"}, long, stream=True)
    await a.pieces_at_least(3)
    await b.pieces_at_least(3)
    c = Answer(agent, PROMPTS[0], short, stream=True)

    async def queued() -> bool:
        return await agent.metric("edgefleet_queue_depth", model=CHAT) == 3

    await wait_for(queued)
    await asyncio.sleep(0.5)
    assert not c.pieces, "both slots are busy: the third request must wait"
    b.leave()
    await b.done()
    await c.pieces_at_least(1, timeout=300)
    waited = c.arrivals[0] - b.left_at
    assert a.ended_at is None, "the first stream ended before the queued request started"
    # What B had left, at the rate A is going: what C would wait if B's slot stayed taken.
    rate = (len(a.pieces) - 1) / (a.arrivals[-1] - a.arrivals[0])
    b_left = (long["max_tokens"] - len(b.pieces)) / rate
    assert waited < max(3.0, b_left / 10), f"waited {waited:.1f}s after the hang-up (B had {b_left:.0f}s left)"
    a.leave()
    await a.done()
    await c.done()
    assert c.outcome == want

    async def counted() -> bool:
        return await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == cancelled + 2

    await wait_for(counted)
    await idle(agent)


async def test_past_the_queue_bound_requests_get_429_with_retry_after(two_slots):
    agent = two_slots
    await idle(agent)
    rejected = await agent.metric("edgefleet_scheduler_rejected_total", model=CHAT)
    settings = {"max_tokens": 40, "temperature": 0, **NO_EOG}

    async def one(i: int) -> tuple[int, Any, str | None]:
        body = {"model": CHAT, "prompt": f"Item {i}: a list of fruits:", **settings}
        async with agent.http.post(agent.url + "/v1/completions", json=body) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    results = await asyncio.gather(*(one(i) for i in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 3 + [429] * 5, statuses  # two running, one queued
    for status, payload, retry_after in results:
        if status == 429:
            assert retry_after is not None and 1 <= int(retry_after) <= 600, retry_after
            assert payload["error"]["type"] == "rate_limit_error"
            assert payload["error"]["code"] == "queue_full"
            assert payload["error"]["message"]
        else:
            assert payload["usage"]["completion_tokens"] == 40
            assert payload["choices"][0]["finish_reason"] == "length"
    assert await agent.metric("edgefleet_scheduler_rejected_total", model=CHAT) == rejected + 5
    await idle(agent)
    status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2})
    assert status == 200, body


# --- one slot: batching off ---------------------------------------------------------------


async def test_one_slot_serves_one_request_at_a_time_with_the_same_answers(state_dir, batched, greedy_alone):
    async with chat_agent(state_dir, BatchingSettings(gguf_slots=1)) as agent:
        for i in (0, 1, 2):
            assert await alone(agent, PROMPTS[i], GREEDY) == greedy_alone[i], f"prompt {i}, one slot"
        seeded = await alone(agent, PROMPTS[3], SEEDED)
        assert seeded == await alone(batched, PROMPTS[3], SEEDED), "seeded, one slot vs batching"
        settings = {"max_tokens": 24, "temperature": 0, **NO_EOG}
        first, second = await together(agent, PROMPTS[2:4], settings, stream=True)
        if first.arrivals[0] > second.arrivals[0]:
            first, second = second, first
        assert second.arrivals[0] >= first.arrivals[-1], "one slot: the second must start after the first ends"
        assert first.usage["completion_tokens"] == second.usage["completion_tokens"] == 24


# --- a slot's context, and the model-time limit ---------------------------------------------


@pytest.mark.cpu_path
async def test_three_slots_of_128_tokens_each_fill_to_the_last_token(state_dir):
    """gguf_ctx_per_slot is what one request may use: three requests at once each run to
    exactly 128 tokens (prompt + answer) with the same text as alone; one more token is refused."""
    story = [{"messages": [{"role": "user", "content": f"Tell a long story about {topic}."}]}
             for topic in ("a lighthouse", "a mountain", "a river")]
    settings = {"temperature": 0, **NO_EOG}  # no max_tokens: up to the end of the slot
    async with chat_agent(state_dir, BatchingSettings(gguf_slots=3, gguf_ctx_per_slot=128)) as agent:
        want = [await alone(agent, p, settings) for p in story]
        for _, usage, finish in want:
            assert finish == "length" and usage["total_tokens"] == 128, usage
        answers = await together(agent, story, settings, stream=[True, False, True])
        for i, answer in enumerate(answers):
            assert_same_as_alone(answer, want[i], f"story {i}")
        prompt_tokens = want[0][1]["prompt_tokens"]
        too_many = await Answer(agent, story[0], {**settings, "max_tokens": 129 - prompt_tokens}).done()
        assert too_many.status == 400 and too_many.error["code"] == "context_length_exceeded", too_many.error


async def test_the_model_time_limit_stops_one_request_of_a_batch_and_not_the_others(state_dir):
    """limits.max_model_time_s counts each request's own model time; in a batch it ends the
    request that ran out of it (finish_reason "length") and nobody else."""
    settings = {"temperature": 0, **NO_EOG}
    limits = LimitsConfig(max_model_time_s=5.0)
    async with chat_agent(state_dir, BatchingSettings(gguf_slots=2), limits=limits) as agent:
        short = {**settings, "max_tokens": 6}
        want = await alone(agent, PROMPTS[0], short)
        assert want[1]["completion_tokens"] == 6, want  # this one is well within the limit
        endless = Answer(agent, PROMPTS[2], {**settings, "max_tokens": 1500}, stream=True)
        await endless.pieces_at_least(1)
        beside = await Answer(agent, PROMPTS[0], short, stream=True).done()
        await endless.done()
        assert endless.finish == "length", endless.finish  # what OpenAI says for a cut-off answer
        assert endless.usage["completion_tokens"] < 1500
        assert endless.ended_at - endless.sent_at < 60
        assert beside.outcome == want
        assert await alone(agent, PROMPTS[0], short) == want
