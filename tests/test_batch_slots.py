"""Where the batching engine keeps its sequences in the llama.cpp context, what moving
them keeps, and in what order it reads waiting prompts.

llama.cpp puts only consecutive sequence ids in one ubatch of a non-unified KV cache, so
a hole in the busy slots splits every decode step into several passes over the weights
(4 sequences in slots 0, 2, 4, 6 cost 1.8 times slots 0-3 on the 2-core VM). The engine
therefore gives newcomers slots next to the busy ones and, when a request in the middle
ends, moves the last sequence into the hole (a KV stream copy), saving the ended
request's KV to a free slot first. A user sees only speed; these tests check the
placement on the engine itself (real model, real llama.cpp context, driven step by step
as the scheduler's thread drives it) and that the moved sequences' text is what they
get alone.
"""

from __future__ import annotations

import time

import pytest
from conftest import CHAT

from runtime.backend import GenerationRequest, GenerationResult, ModelLimits, TextDelta, TokenLogprob
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.gguf.gguf_backend import GgufBackend
from runtime.gguf.gguf_batch import MIN_PIECE

pytestmark = pytest.mark.slow

SYSTEM = "You keep a fleet of edge devices running. Answer in one sentence and name the device. " * 5
QUESTIONS = ["Device 3 is hot.", "Device 8 lost power.", "Device 1 reboots often.", "Device 5 is slow."]
#: SmolLM2's end-of-generation tokens banned: every answer runs to max_tokens.
SETTINGS = {"max_tokens": 20, "temperature": 0.0, "logit_bias": {0: -100.0, 2: -100.0, 4: -100.0}}


class Caller:
    """What the scheduler's job is to the engine: it collects the text and can hang up."""

    limits = ModelLimits()

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.gone = False

    def cancelled(self) -> bool:
        return self.gone

    def emit(self, item: object) -> None:
        if isinstance(item, TokenLogprob):  # asked for with `logprobs`
            self.logprobs.append(item)
            return
        assert isinstance(item, TextDelta)
        self.pieces.append(item.text)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def request(question: str) -> GenerationRequest:
    """A prompt that differs from the others' from its first token and is over two prompt
    chunks long, so the only KV that can serve it again is its own."""
    return GenerationRequest(prompt=(question + " ") * 12 + SYSTEM, **SETTINGS)


def open_backend(state_dir) -> GgufBackend:
    backend = GgufBackend(read_bundle(state_dir / "models" / CHAT / "current"), MachineSettings(cpu=describe_cpu()))
    assert backend.engine is not None and backend.engine.slots >= 6
    return backend


@pytest.fixture(scope="module")
def reference(state_dir):
    """Answers alone, from a context of their own."""
    backend = open_backend(state_dir)
    yield {q: alone(backend, q)[0] for q in QUESTIONS}
    backend.close()


@pytest.fixture
def fresh(state_dir):
    backend = open_backend(state_dir)
    yield backend
    backend.close()


def alone(backend: GgufBackend, question: str) -> tuple[str, GenerationResult]:
    caller = Caller()
    result = backend.generate(request(question), caller)
    return caller.text, result


def busy_slots(engine) -> list[int]:
    return sorted(seq.slot.index for seq in engine._seqs)


def one_run(slots: list[int]) -> bool:
    return slots == list(range(slots[0], slots[0] + len(slots)))


def test_a_request_ending_mid_batch_leaves_the_others_in_one_run_with_their_own_text(fresh, reference):
    engine = fresh.engine
    engine.prefill_slice_s = float("inf")  # all four prompts first: all four generate together
    callers = {q: Caller() for q in QUESTIONS}
    for question, caller in callers.items():
        engine.add(request(question), caller)
    results: dict[int, GenerationResult] = {}

    def step() -> None:
        for ctx, result, error in engine.step():
            assert error is None and result is not None
            results[id(ctx)] = result

    while any(seq.pending is None for seq in engine._seqs):  # until all four generate
        step()
    first = busy_slots(engine)
    assert one_run(first), f"newcomers spread over slots {first}"

    leaver = next(seq.ctx for seq in engine._seqs if seq.slot.index == first[1])
    leaver.gone = True
    step()
    after = busy_slots(engine)
    assert len(after) == 3 and one_run(after), f"a hole stayed: slots {after}"
    while engine.active:
        step()

    for question, caller in callers.items():
        if caller is leaver:
            assert reference[question].startswith(caller.text)
        else:
            assert caller.text == reference[question], f"{question!r} changed when moved to another slot"
            assert results[id(caller)].completion_tokens == SETTINGS["max_tokens"]

    # The ended request's KV was kept in a free slot: asked again, its prompt is read from cache.
    question = next(q for q, c in callers.items() if c is leaver)
    text, result = alone(fresh, question)
    assert text == reference[question]
    assert result.cached_tokens >= 2 * engine.chunk, f"only {result.cached_tokens} prompt tokens reused"


def test_a_newcomer_gets_a_slot_next_to_the_busy_one_and_its_cached_prompt_copied_there(fresh, reference):
    engine = fresh.engine
    alone(fresh, QUESTIONS[0])
    cache = max(engine._slots, key=lambda slot: slot.last_used).index
    for question in QUESTIONS[1:3]:  # other slots get used, so the next goes further away
        alone(fresh, question)
    runner = Caller()
    engine.add(request(QUESTIONS[3]), runner)
    engine.step()
    (busy,) = busy_slots(engine)
    assert abs(busy - cache) > 1, f"test premise: the cached prompt (slot {cache}) must not border slot {busy}"

    newcomer = Caller()
    engine.add(request(QUESTIONS[0]), newcomer)
    assert one_run(busy_slots(engine)), busy_slots(engine)
    results = {}
    while engine.active:
        for ctx, result, error in engine.step():
            assert error is None
            results[id(ctx)] = result
    assert newcomer.text == reference[QUESTIONS[0]]
    assert runner.text == reference[QUESTIONS[3]]
    assert results[id(newcomer)].cached_tokens >= 2 * engine.chunk


def test_a_short_prompt_behind_a_long_one_waits_for_one_of_its_chunks_not_all(fresh, reference):
    """Prompts take turns while others generate: the short one starts after one chunk of
    the long one, and both answers are what they are alone."""
    engine = fresh.engine
    runner = Caller()
    engine.add(request(QUESTIONS[0]), runner)
    while engine._seqs[0].pending is None:  # someone is generating: prompts go in slices
        engine.step()
    long_caller, short_caller = Caller(), Caller()
    long_prompt = GenerationRequest(prompt=(QUESTIONS[1] + " ") * 12 + SYSTEM * 6, **SETTINGS)
    engine.add(long_prompt, long_caller)
    engine.step()  # the long prompt's first chunk
    engine.add(GenerationRequest(prompt=QUESTIONS[2], **SETTINGS), short_caller)
    long_seq = next(seq for seq in engine._seqs if seq.ctx is long_caller)
    steps = 0
    while not short_caller.pieces:
        engine.step()
        steps += 1
    assert long_seq.pos < len(long_seq.tokens), "the long prompt was read to its end first"
    assert steps <= 3, f"the short prompt waited {steps} steps"
    while engine.active:
        engine.step()
    assert runner.text == reference[QUESTIONS[0]]
    assert len(long_caller.pieces) and len(short_caller.pieces)


def test_a_step_that_read_a_short_prompt_starts_no_chunk_that_would_overrun_the_slice(fresh, reference):
    """While others generate, a step reads prompt chunks for about the slice: a cheap short
    prompt read first does not pull a long prompt's expensive chunk into the same stall."""
    engine = fresh.engine
    runner = Caller()
    engine.add(request(QUESTIONS[0]), runner)
    while engine._seqs[0].pending is None:
        engine.step()
    long_caller, short_caller = Caller(), Caller()
    engine.add(GenerationRequest(prompt=(QUESTIONS[1] + " ") * 12 + SYSTEM * 6, **SETTINGS), long_caller)
    engine.add(GenerationRequest(prompt=QUESTIONS[2], **SETTINGS), short_caller)
    long_seq = next(seq for seq in engine._seqs if seq.ctx is long_caller)
    short_seq = next(seq for seq in engine._seqs if seq.ctx is short_caller)
    engine.prefill_slice_s = 0.0
    began = time.monotonic()
    engine.step()  # the long prompt came first: one piece of it (and the runner's token)
    step_s = time.monotonic() - began
    first_piece = long_seq.pos
    assert first_piece > 0 and short_seq.pos == 0
    engine.prefill_slice_s = step_s / 2  # a whole piece overruns it, the short prompt does not

    engine.step()  # the short prompt's turn; the long prompt's next piece would overrun
    assert short_caller.pieces, "the short prompt was not read"
    assert long_seq.pos == first_piece, "a long piece was read in the same step as the short prompt"
    engine.step()
    assert long_seq.pos > first_piece, "the long prompt lost its turn"
    while engine.active:
        engine.step()
    assert runner.text == reference[QUESTIONS[0]]


@pytest.fixture
def f16_flash(state_dir):
    """The demo model on an f16 KV cache with flash attention (what tuning may choose, or a
    bundle set), everything else as the defaults."""
    from runtime.tuning.search import baseline
    from runtime.tuning.settings import FixedChoice

    bundle = read_bundle(state_dir / "models" / CHAT / "current")
    base, _, _ = baseline(bundle, MachineSettings(cpu=describe_cpu()))
    settings = base.with_knob("attention", "f16+fa")
    backend = GgufBackend(bundle, MachineSettings(cpu=describe_cpu(), tuning=FixedChoice(settings)))
    assert backend._options.kv_type == "f16" and backend._options.flash_attn
    yield backend
    backend.close()


@pytest.mark.parametrize("cache", ["q8_0", "f16+fa"])
def test_long_conversations_get_their_alone_text_beside_others(cache, request):
    """Past 256 cells of context llama.cpp's CPU attention has a path of its own for one
    sequence alone (split over the KV cells) and another for several, with an f16 KV cache
    and flash attention: a greedy answer could change with the load. The q8_0 cache takes
    one path for all; with f16 the engine measures the long rows at load and, where they
    differ, decodes a greedy sequence alone, on the same path it takes with no load."""
    fresh = request.getfixturevalue("fresh" if cache == "q8_0" else "f16_flash")
    assert fresh._options.kv_type == cache.split("+")[0]
    engine = fresh.engine
    long = {q: GenerationRequest(prompt=(q + " ") * 12 + SYSTEM * 4, logprobs=2, **dict(SETTINGS, max_tokens=32))
            for q in QUESTIONS}
    assert all(len(fresh.prepare(r, Caller()).tokens) > 300 for r in long.values())
    alone_text, alone_logprobs = {}, {}
    for question, req in long.items():
        caller = Caller()
        engine.run(req, caller)
        alone_text[question], alone_logprobs[question] = caller.text, caller.logprobs
    callers = {q: Caller() for q in QUESTIONS}
    engine.prefill_slice_s = float("inf")  # all four prompts first: all four decode together
    for question, caller in callers.items():
        engine.add(long[question], caller)
    engine.step()
    assert sum(seq.pending is not None for seq in engine._seqs) == len(QUESTIONS)
    while engine.active:
        engine.step()
    for question, caller in callers.items():
        assert caller.text == alone_text[question], f"{question!r} changed beside others"
        # the rule is about bits: the log probabilities a client reads are the same numbers
        assert caller.logprobs == alone_logprobs[question], f"{question!r}'s log probabilities changed"


def test_a_repeat_and_a_next_turn_reuse_what_the_kernels_allow_and_answer_as_from_scratch(fresh, state_dir):
    """Where any split of a prompt and any batch give the same bits (measured at start: the
    q8_0 cache on the CPU), a repeat evaluates only its last token and a next turn reuses the previous
    answer's KV; elsewhere the cache reuses whole canonical pieces. Either way the answer is
    the one a fresh context gives."""
    engine = fresh.engine
    engine.warm()
    first_text, first = alone(fresh, QUESTIONS[0])
    repeat_text, repeat = alone(fresh, QUESTIONS[0])
    assert repeat_text == first_text
    whole = first.prompt_tokens - 1  # the last prompt token is evaluated again for its logits
    free = engine.splits_free and engine.rows_independent
    assert repeat.cached_tokens == (whole if free else whole // engine.chunk * engine.chunk)

    turn = GenerationRequest(prompt=request(QUESTIONS[0]).prompt + first_text + " And device 9?", **SETTINGS)
    caller = Caller()
    turn_result = fresh.generate(turn, caller)
    if free:
        assert turn_result.cached_tokens > first.prompt_tokens, "the previous answer was evaluated again"
    other = open_backend(state_dir)
    try:
        scratch = Caller()
        other.generate(turn, scratch)
    finally:
        other.close()
    assert caller.text == scratch.text


def test_where_splits_are_free_a_newcomer_is_read_in_pieces_that_fit_the_slice(fresh, reference):
    engine = fresh.engine
    runner = Caller()
    engine.add(request(QUESTIONS[0]), runner)
    while engine._seqs[0].pending is None:
        engine.step()
    newcomer = Caller()
    engine.add(request(QUESTIONS[1]), newcomer)
    seq = next(s for s in engine._seqs if s.ctx is newcomer)
    engine.prefill_slice_s = 0.0  # no time to spare: the smallest piece
    engine.step()
    assert seq.pos == (MIN_PIECE if engine.splits_free else engine.chunk)
    while engine.active:
        engine.step()
    assert newcomer.text == reference[QUESTIONS[1]]
    assert runner.text == reference[QUESTIONS[0]]


def test_a_prompt_a_little_over_the_slice_is_read_whole_not_left_a_short_tail(fresh, reference):
    """A newcomer's prompt whose rest would take under half the slice is read in this step,
    so its first token does not wait a decode step for a 16-token tail; one further over
    the slice is still read in pieces."""
    engine = fresh.engine
    runner = Caller()
    engine.add(request(QUESTIONS[0]), runner)
    while engine._seqs[0].pending is None:
        engine.step()
    if not engine.splits_free:
        pytest.skip("prompts are read in canonical chunks on this machine")
    rate = engine._prompt_s_per_token
    near, far = Caller(), Caller()
    short = GenerationRequest(prompt=(QUESTIONS[1] + " ") * 6 + SYSTEM[:60], **SETTINGS)
    engine.add(short, near)
    seq = next(s for s in engine._seqs if s.ctx is near)
    n = len(seq.tokens)
    assert 40 < n <= engine.chunk  # one call can hold it
    engine.prefill_slice_s = (n - 12) * rate  # all but 12 tokens fit: the 12 take a third of the slice
    engine.step()
    assert seq.pos == n and seq.pending is not None, f"read {seq.pos} of {n} tokens"
    engine.add(request(QUESTIONS[2]), far)
    seq = next(s for s in engine._seqs if s.ctx is far)
    engine.prefill_slice_s = (len(seq.tokens) // 2) * rate  # half is left: more than half the slice
    engine.step()
    assert 0 < seq.pos < len(seq.tokens)
    engine.prefill_slice_s = float("inf")
    while engine.active:
        engine.step()
    assert (runner.text, far.text) == (reference[QUESTIONS[0]], reference[QUESTIONS[2]])
    again = Caller()
    fresh.generate(short, again)  # the short prompt alone, nothing beside it
    assert near.text == again.text


def test_prompts_waiting_together_are_read_together_where_the_bits_allow(fresh, reference):
    """llama-server reads every waiting prompt in one batch. The engine does too, an equal
    piece of each per llama.cpp call, where it measured that this changes no bits; elsewhere
    one prompt per call. Either way each answer is its answer alone."""
    engine = fresh.engine
    engine.warm()  # its checks read prompts of their own
    real = engine._lib
    calls: list[list[int]] = []  # the sequence ids of every llama_decode call

    class Spy:  # the real llama.cpp binding, each decode call's sequences noted
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def llama_decode(self, ctx, batch):  # type: ignore[no-untyped-def]
            calls.append(sorted({batch.seq_id[i][0] for i in range(batch.n_tokens)}))
            return real.llama_decode(ctx, batch)

    engine._lib = Spy()
    callers = {question: Caller() for question in QUESTIONS[:3]}
    for question, caller in callers.items():
        engine.add(request(question), caller)
    engine.step()
    together = engine.splits_free and engine.rows_independent
    assert len(calls[0]) == (3 if together else 1), calls
    while engine.active:
        engine.step()
    for question, caller in callers.items():
        assert caller.text == reference[question]


def test_a_client_that_leaves_while_its_prompt_is_read_together_frees_its_slot_alone(fresh, reference):
    """Three prompts read piece by piece beside a generating request; one client leaves
    half way: its slot frees at the next step, and the other answers are their answers alone."""
    engine = fresh.engine
    runner = Caller()
    engine.add(request(QUESTIONS[3]), runner)
    while engine._seqs[0].pending is None:  # someone is generating: prompts go in slices
        engine.step()
    callers = {question: Caller() for question in QUESTIONS[:3]}
    for question, caller in callers.items():
        engine.add(request(question), caller)
    seqs = {question: next(s for s in engine._seqs if s.ctx is caller) for question, caller in callers.items()}
    engine.prefill_slice_s = 56 * engine._prompt_s_per_token  # room for 3 pieces of 16-18 tokens
    engine.step()
    if engine.splits_free and engine.rows_independent:
        assert all(0 < seq.pos < len(seq.tokens) for seq in seqs.values()), "not read together"
    leaver = callers[QUESTIONS[0]]
    leaver.gone = True
    engine.step()
    assert all(seq.ctx is not leaver for seq in engine._seqs), "the slot was not freed"
    engine.prefill_slice_s = float("inf")
    while engine.active:
        engine.step()
    assert leaver.pieces == []
    for question in QUESTIONS[1:3]:
        assert callers[question].text == reference[question]
    assert runner.text == reference[QUESTIONS[3]]
