"""Continuous batching for a GGUF model: several requests in one llama.cpp context.

One context with `slots` sequences (llama.cpp's `n_seq_max`, one KV stream of
`ctx_per_slot` cells each). The model thread calls `step()` again and again; each
step evaluates newcomers' prompt chunks (taking turns, for a bounded time), then one
decode call that carries the last sampled token of every generating sequence (one
`llama_batch`, one sequence id per slot), and samples each row with that request's own
settings (the plain greedy rows of a call together, one argmax over the call's logits,
`_greedy_choices`). New
requests join between steps (`add`), finished and cancelled ones leave at the next
step and free their slot at once. The scheduler (runtime/scheduling/batch_scheduler.py) does
the admitting; this module knows llama.cpp, not jobs' queues.

Why prompts go in chunks of their own: the rule of docs/architecture.md
("Repeatable greedy output") is kept per slot. A prompt is evaluated in `chunk`
pieces aligned to position 0, each piece alone in its llama_decode call, so its KV
is computed as a fresh single-sequence context computes it, whatever else runs; a
slot's KV stream keeps cell i at position i; the prefix cache of each slot reuses
only whole canonical pieces for requests that must repeat. A newcomer is put in the
free slot whose cached tokens share the longest reusable prefix with its prompt, so a
shared system prompt is evaluated once per slot, not once per request. Pieces also bound
how long a long newcomer stalls the others: prompt evaluation between two decode steps
stops after about `PREFILL_SLICE_S`, and a chunk predicted to overrun it waits for the
next step. With an f16 KV cache the piece (64 for the demo) is also the floor of that
stall: llama.cpp's CPU flash attention computes calls of 64 or more query rows on a tiled
F32 path and smaller ones on a per-row F16 path, so the same prompt read in smaller
pieces gets other bits. With a quantized cache (q8_0, the default) every shape takes the
per-row path; where `warm` measures that any split gives the same bits (`splits_free`),
the canonical pieces do not matter: the prefix cache reuses every cached token (a
previous answer's too), a newcomer's prompt is read in pieces sized to what is left
of the step's slice, so the others' stall is about the slice, not a whole chunk, and
prompts waiting together are read together, an equal piece of each in one call, as
llama-server reads them (one pass over the weights for all).

What batching changes: a generated token's logits come from a decode call whose
rows belong to other requests too. The engine measures at start whether this machine's
kernels compute a row to the same bits whatever else rides in the call
(`rows_independent`; true on the AVX2 CPU path measured). Where they do, every sequence
shares one decode call per step and greedy text under load is the text alone. Where they
do not (GPU kernels picked by batch size, CPU GEMM paths that tile rows), repeatable
sequences (temperature 0 or a seed) are decoded one per call, which keeps the rule at
the cost of their batching, and the others share a call.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from runtime.backend import GenerationRequest, GenerationResult, JobContext, TextDelta, TokenLogprob
from runtime.errors import InferenceError, InvalidInputError, WorkStopped
from runtime.gguf.llama_params import KV_TYPES, LLAMA_SAMPLING_DEFAULTS, PreparedPrompt
from runtime.gguf.text_stream import TextStream

if TYPE_CHECKING:
    import numpy as np


class BatchModel(Protocol):
    """What the engine needs of a loaded GGUF model (runtime/gguf/gguf_backend.py's `GgufBackend`
    is one): its weights, how it reads prompts, and how tokens become text."""

    placement: Any

    @property
    def llm(self) -> Any: ...
    @property
    def chunk(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    def prepare(self, request: GenerationRequest, ctx: JobContext) -> PreparedPrompt: ...
    @property
    def vocab(self) -> Any: ...
    def piece(self, token: int) -> bytes: ...

log = logging.getLogger(__name__)

#: Seconds of prompt evaluation between two decode steps while others generate: the most a
#: newcomer's prompt delays the running streams' next token (one chunk at least). A chunk is
#: not started when its predicted time would pass the slice.
PREFILL_SLICE_S = 0.15
#: Weight of the newest chunk in the running estimate of prompt seconds per token.
PROMPT_RATE_WEIGHT = 0.3
#: Where any split of a prompt gives the same bits (`splits_free`), the smallest piece of a
#: prompt read while others generate: smaller pieces would waste the pass over the weights.
MIN_PIECE = 16
#: Where splits are free and others are waiting for their next token, a prompt whose rest
#: after its piece would take no more than this share of the slice is read whole now: its
#: first token comes a decode step sooner (a short prompt is not cut into a piece and a
#: 16-token tail a step later), and the others' stall grows by at most this share of the
#: slice. 0 (EDGEFLEET_BENCH_OLD_PATHS=tail, bench/bench_load.py's A/B) leaves the tail for
#: the next step.
TAIL_SHARE = 0.0 if "tail" in os.environ.get("EDGEFLEET_BENCH_OLD_PATHS", "").split(",") else 0.5
#: False only to measure the old way (bench/bench_load.py's A/B): each greedy row is chosen by
#: its own argmax over a copy of its row.
SAMPLE_TOGETHER = "sample" not in os.environ.get("EDGEFLEET_BENCH_OLD_PATHS", "").split(",")
#: llama-cpp-python's Llama.last_n_tokens_size: how far back repeat penalties look.
PENALTY_LAST_N = 64
#: A newcomer's prompt prefix cached in a slot it cannot use (one that would split the busy
#: slots) is copied into the slot it gets when that saves at least this many tokens of
#: prompt evaluation: a copy moves a whole KV stream (about 11 ms for 2048 cells of the demo
#: model on the 2-core VM), 32 prompt tokens take about 150 ms there.
COPY_MIN_TOKENS = 32


def greedy_bias(request: GenerationRequest) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids, values) of the logit bias a greedy request adds to its row before the argmax."""
    if not request.logit_bias:
        return None
    import numpy as np

    return (np.fromiter(request.logit_bias.keys(), dtype=np.intc, count=len(request.logit_bias)),
            np.fromiter(request.logit_bias.values(), dtype=np.float32, count=len(request.logit_bias)))


def token_logprob(row: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """`token`'s log probability in the log-softmax of logits `row` (as llama-server and
    OpenAI report them: before temperature, penalties and grammar), with the `top` most
    likely tokens of the row, most likely first."""
    import numpy as np

    high = float(row.max())
    lse = high + float(np.log(np.exp((row - high).astype(np.float64)).sum()))
    best: tuple[tuple[bytes, float], ...] = ()
    if top:
        ids = np.argpartition(row, -top)[-top:]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((piece(int(t)), float(row[t]) - lse) for t in ids)
    return TokenLogprob(piece(token), float(row[token]) - lse, best)


def grammar_sampler(lib: Any, vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler for GBNF `grammar` (root rule `root`); a grammar llama.cpp
    cannot parse is the request's error."""
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidInputError("the grammar built for this request could not be parsed by llama.cpp",
                                param="response_format")
    return sampler


class GrammarPick:
    """Token choice under a grammar, as llama-server's sampler makes it (common/sampling.cpp):
    the token chosen without the grammar is tried against it alone (one candidate), and only
    when the grammar rejects it is the grammar applied to the whole vocabulary (several
    milliseconds for a 49k vocabulary) and the choice made again. Either way the token is the
    one the grammar-masked row gives, so greedy output stays repeatable."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        import numpy as np

        self._lib = lib
        self._one = (lib.llama_token_data * 1)()
        self._one_array = lib.llama_token_data_array(self._one, 1, -1, False)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._all = np.zeros(n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self._all_array = lib.llama_token_data_array(
            ctypes.cast(self._all.ctypes.data, ctypes.POINTER(lib.llama_token_data)), n_vocab, -1, False)

    def _allowed(self, grammar: Any, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        self._lib.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return self._one[0].logit != float("-inf")

    def _fill(self, row: np.ndarray) -> Any:
        """The whole row as llama.cpp candidates (samplers sort and cut the array in place)."""
        self._all["id"] = self._ids
        self._all["logit"] = row
        self._all["p"] = 0.0
        array = self._all_array
        array.size, array.selected, array.sorted = len(self._ids), -1, False
        return ctypes.byref(array)

    def greedy(self, grammar: Any, row: np.ndarray, token: int) -> int:
        """The argmax of `row` under `grammar`, given `token`, the argmax without it."""
        if self._allowed(grammar, token):
            return token
        self._lib.llama_sampler_apply(grammar, self._fill(row))
        return int(self._all["logit"].argmax())

    def sample(self, grammar: Any, chain: Any, row: np.ndarray) -> int:
        """A draw of sampler `chain` from `row` under `grammar`; both have accepted it."""
        lib = self._lib
        lib.llama_sampler_apply(chain, self._fill(row))
        token = int(self._all["id"][self._all_array.selected])
        if not self._allowed(grammar, token):
            candidates = self._fill(row)
            lib.llama_sampler_apply(grammar, candidates)
            lib.llama_sampler_apply(chain, candidates)
            token = int(self._all["id"][self._all_array.selected])
        lib.llama_sampler_accept(grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token


def build_sampler(request: GenerationRequest, seed: int, n_vocab: int) -> Any:
    """A llama.cpp sampler chain with llama-cpp-python's create_completion settings for
    `request` (logit bias, penalties, top-k 40, typical, top-p, min-p 0.05, temperature,
    seeded draw), or None for greedy without penalties, which is an argmax of the row (plus
    the logit bias, `greedy_bias`): llama_sampler_sample builds a candidate array of the
    whole vocabulary per token (600 KB here, a fresh mapping each time with the agent's
    mmap threshold), which costs more than the argmax. A grammar is not part of the chain:
    `GrammarPick` applies it only when the chain's choice breaks it."""
    from llama_cpp import _internals

    penalties = request.presence_penalty or request.frequency_penalty
    if request.temperature == 0 and not penalties:
        return None
    chain = _internals.LlamaSampler()
    if request.logit_bias:
        chain.add_logit_bias(n_vocab, request.logit_bias)
    if penalties:
        chain.add_penalties(n_vocab, PENALTY_LAST_N, LLAMA_SAMPLING_DEFAULTS["repeat_penalty"],
                            request.frequency_penalty, request.presence_penalty)
    if request.temperature == 0:
        chain.add_greedy()
        return chain
    chain.add_top_k(LLAMA_SAMPLING_DEFAULTS["top_k"])
    chain.add_typical(LLAMA_SAMPLING_DEFAULTS["typical_p"], 1)
    chain.add_top_p(request.top_p, 1)
    chain.add_min_p(LLAMA_SAMPLING_DEFAULTS["min_p"], 1)
    chain.add_temp(request.temperature)
    chain.add_dist(seed)
    return chain


@dataclass
class _Slot:
    """One sequence id of the context and what its KV stream holds."""

    index: int
    #: tokens whose KV sits at positions 0..len-1 of this slot
    history: list[int] = field(default_factory=list)
    #: leading positions computed from whole aligned chunks (reusable by repeatable requests)
    canonical: int = 0
    last_used: float = 0.0
    busy: bool = False


@dataclass
class _Sequence:
    """One request in the batch."""

    ctx: JobContext
    slot: _Slot
    tokens: list[int]
    repeatable: bool
    #: next prompt position to evaluate; == len(tokens) once generating
    pos: int
    cached: int
    sampler: Any
    #: logit bias added before a greedy argmax (when `sampler` is None)
    bias: tuple[np.ndarray, np.ndarray] | None
    #: llama.cpp's grammar sampler of a constrained request (structured output, tool calls)
    grammar: Any
    #: alternatives reported with each token's log probability; None: none reported
    logprobs: int | None
    text: TextStream
    max_tokens: int
    generated: int = 0
    #: the sampled token whose KV is not computed yet (fed to the next decode step)
    pending: int | None = None
    #: when its prompt last got a chunk evaluated (admission time until then): prompts
    #: take turns by this
    served: float = field(default_factory=time.monotonic)
    #: seconds per token of its last prompt piece (a piece costs more the later it sits in
    #: a long prompt, so its own last piece predicts its next one best)
    s_per_token: float | None = None


class BatchEngine:
    """The batch of one GGUF model; every method runs on the model's thread."""

    def __init__(self, backend: BatchModel, slots: int, ctx_per_slot: int, flash_attn: bool,
                 kv_type: str = "f16") -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._backend = backend
        llm = backend.llm
        self.slots = slots
        self.ctx_per_slot = ctx_per_slot
        self.chunk = backend.chunk
        self._n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * ctx_per_slot
        # Room for a piece of every slot's prompt in one call (see `_read_prompts_together`),
        # within the bundle's n_batch (not the tokenizing wrapper's, whose context is tiny).
        self._call_rows = max(self.chunk, slots, min(self.chunk * slots, backend.n_batch))
        params.n_batch = params.n_ubatch = self._call_rows
        params.n_seq_max = slots
        params.kv_unified = False  # one KV stream per slot: a sequence's cells are its own
        params.n_threads = backend.placement.n_threads
        params.n_threads_batch = backend.placement.n_threads_batch
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = params.type_v = KV_TYPES[kv_type][0]
        params.no_perf = True
        #: llama.cpp's CPU flash attention has a path of its own for one sequence alone with a
        #: window of 512 cells or more, for f16/f32 caches only (ggml-cpu ops.cpp, split KV)
        self._long_window_path = flash_attn and kv_type == "f16"
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise InferenceError(f"llama.cpp could not make a context of {slots} x {ctx_per_slot} tokens")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(slots)]
        self._seqs: list[_Sequence] = []
        self._get_logits = llama_cpp.llama_get_logits_ith
        self._sample = llama_cpp.llama_sampler_sample
        # bound once: each runs per generated token
        self._eog, self._vocab, self._piece = llama_cpp.llama_vocab_is_eog, backend.vocab, backend.piece
        self._row_type = ctypes.c_float * self._n_vocab
        self._rows_types: dict[int, Any] = {}  # ctypes arrays of n rows of logits, by n
        self._grammar_pick = GrammarPick(llama_cpp, self._n_vocab)
        self._closed = False
        #: Whether llama.cpp computes a decode row to the same bits whatever else is in the
        #: batch (measured by `warm`, on this machine's kernels; None until then); if not,
        #: repeatable sequences are decoded one per call (see `_decode_groups`).
        self.rows_independent: bool | None = None
        #: Whether a prompt's KV and logits are the same bits however it is split into calls,
        #: a 1-token call (a decode step) included (measured by `warm` where the KV cache is
        #: quantized, the only case where llama.cpp's CPU attention takes one path for every
        #: shape; False otherwise). Then the canonical pieces of the repeatable-output rule do
        #: not matter: the prefix cache reuses every cached token, a previous answer's too, and
        #: a newcomer's prompt is read in pieces sized to the step's time budget.
        self.splits_free: bool | None = None if kv_type != "f16" else False
        #: running estimate of prompt evaluation seconds per token (None until a chunk ran),
        #: for a prompt's first piece
        self._prompt_s_per_token: float | None = None
        self.prefill_slice_s = PREFILL_SLICE_S

    def warm(self) -> None:
        """Measure `rows_independent`, on the calling thread, which must be the thread that
        steps the engine (the first `step` calls this too).

        Why not at load: llama.cpp's CPU backend computes on OpenMP, and libgomp keeps a team
        of worker threads for every thread that ever ran a graph. Once it counts more of them
        than CPUs, its barriers stop spinning: every thread then sleeps and is woken at each
        of the graph's barriers, about a hundred times a token. Measured on the 2-core VM: a
        load-time decode on the loading thread made decode through the agent 8% slower for
        one stream and 48% slower at 4 clients (docs/performance.md). So all of a model's compute, this check
        included, runs on its model thread."""
        if self.rows_independent is None:
            self.rows_independent = self._measure_row_independence()
        if self.splits_free is None:
            self.splits_free = self._measure_split_independence()

    @property
    def bits_free(self) -> bool:
        """Whether a row's bits depend neither on how its prompt is split nor on what rides
        in its call (both measured by `warm`): then the prefix cache reuses any cached token,
        a previous answer's too, and waiting prompts share calls."""
        return bool(self.splits_free and self.rows_independent)

    # --- admission ---------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._seqs)

    def free_slots(self) -> int:
        return sum(1 for slot in self._slots if not slot.busy)

    def kv_cache_usage(self) -> float:
        """Cells holding KV over the context's n_ctx, as llama-server's kv_cache_usage_ratio
        counts them: running requests' cells and the prefix cache idle slots keep. Read from
        any thread (list lengths; a scrape may see a step half done)."""
        return sum(len(slot.history) for slot in self._slots) / (self.slots * self.ctx_per_slot)

    def add(self, request: GenerationRequest, ctx: JobContext) -> None:
        """Take a request into a free slot (raises the request's own errors: bad input,
        context too long). Its prompt is evaluated by the following steps."""
        prepared = self._backend.prepare(request, ctx)
        tokens = prepared.tokens
        repeatable = request.temperature == 0 or request.seed is not None
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        grammar = grammar_sampler(self._lib, self._vocab, prepared.grammar) if prepared.grammar else None
        sampler = build_sampler(request, seed, self._n_vocab)
        slot, keep = self._pick_slot(tokens, repeatable)
        slot.busy = True
        slot.last_used = time.monotonic()
        self._lib.llama_memory_seq_rm(self._mem, slot.index, keep, -1)
        del slot.history[keep:]
        slot.canonical = min(slot.canonical, keep) // self.chunk * self.chunk
        self._seqs.append(_Sequence(
            ctx=ctx, slot=slot, tokens=tokens, repeatable=repeatable, pos=keep, cached=keep,
            sampler=sampler, bias=greedy_bias(request),
            grammar=grammar, logprobs=request.logprobs,
            text=TextStream(prepared.stops),
            max_tokens=prepared.max_tokens,
        ))

    def run(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult:
        """Serve `request` to its end, stepping the engine on this thread (for callers
        in-process; raises the request's error)."""
        self.add(request, ctx)
        while True:
            for done_ctx, result, error in self.step():
                if done_ctx is ctx:
                    if error is not None:
                        raise error
                    assert result is not None
                    return result

    def _reusable(self, slot: _Slot, tokens: list[int], repeatable: bool) -> int:
        """Prompt tokens whose KV `slot` already holds and this request may reuse: the
        rule of `GgufBackend._prefill`, per slot."""
        n = len(tokens)
        # Any cached token is what a fresh read computes only if splits are free and decode
        # rows are too (else a shared decode call may have computed a sampled answer's KV).
        canonical_only = repeatable and not self.bits_free
        limit = min(len(slot.history), n - 1, slot.canonical if canonical_only else n)
        same = 0
        history = slot.history
        while same < limit and history[same] == tokens[same]:
            same += 1
        return same // self.chunk * self.chunk if canonical_only else same

    def _pick_slot(self, tokens: list[int], repeatable: bool) -> tuple[_Slot, int]:
        """A free slot next to the busy ones (see `_compact` for why they stay one run):
        the one that can reuse the most of the prompt, among equals the one used longest ago
        (so other slots' cached prompts survive longer). When another slot, busy or not,
        holds a longer reusable prefix, its KV stream is copied into the chosen one."""
        free = [slot for slot in self._slots if not slot.busy]
        busy = [slot.index for slot in self._slots if slot.busy]
        near = [slot for slot in free if busy and min(busy) - 1 <= slot.index <= max(busy) + 1]
        reuse = {slot.index: self._reusable(slot, tokens, repeatable) for slot in self._slots}
        # a few shared tokens (a chat template's header) are not worth another prompt's cache
        worth = {index: n if n >= COPY_MIN_TOKENS else 0 for index, n in reuse.items()}
        target = max(near or free, key=lambda slot: (worth[slot.index], -slot.last_used, slot.index))
        keep = reuse[target.index]
        source = max(self._slots, key=lambda slot: reuse[slot.index])
        if reuse[source.index] >= keep + COPY_MIN_TOKENS:
            self._copy(source, target)
            keep = reuse[source.index]
        return target, keep

    def _copy(self, source: _Slot, target: _Slot) -> None:
        """`target`'s KV stream becomes a copy of `source`'s, cell for cell (so a canonical
        prefix stays canonical). llama.cpp copies whole streams between the sequences of a
        non-unified cache, at the start of the next llama_decode."""
        self._lib.llama_memory_seq_cp(self._mem, source.index, target.index, -1, -1)
        target.history = list(source.history)
        target.canonical = source.canonical
        target.last_used = source.last_used

    def _compact(self) -> None:
        """Keep the busy slots one run of consecutive sequence ids. llama.cpp puts only
        consecutive ids in one ubatch of a non-unified cache (`split_equal`), so a hole
        splits a decode step into several passes over the weights: measured on the 2-core
        VM, 4 sequences in slots 0, 2, 4, 6 take 49 ms a step, in slots 0-3 27 ms. A hole
        left by a finished request is filled by moving the last busy sequence into it (one
        stream copy). The finished request's KV is first copied to a free slot outside the
        run when there is one, so its follow-up turn still finds it."""
        while self._seqs:
            by_slot = sorted(self._seqs, key=lambda seq: seq.slot.index)
            lo, hi = by_slot[0].slot.index, by_slot[-1].slot.index
            if hi - lo + 1 == len(by_slot):
                return
            hole = next(slot for slot in self._slots[lo:hi] if not slot.busy)
            spare = [slot for slot in self._slots if not slot.busy and not lo <= slot.index <= hi]
            if spare and hole.history:
                self._copy(hole, min(spare, key=lambda slot: slot.last_used))
            mover = by_slot[-1]
            self._copy(mover.slot, hole)
            mover.slot.busy, hole.busy = False, True
            mover.slot.last_used = time.monotonic()
            mover.slot = hole

    # --- one step ----------------------------------------------------------

    def step(self, ran: Callable[[int], None] = lambda rows: None,
             ) -> list[tuple[JobContext, GenerationResult | None, BaseException | None]]:
        """Evaluate newcomers' prompt chunks, then one decode step for every generating
        sequence. Returns the requests that finished, with result or error. `ran(n)` is told
        of every decode call and how many sequences it carried.

        Prompts take turns, the one served longest ago first (a newcomer counts from its
        admission), so a short prompt that arrives behind a long one waits for one of its
        chunks, not for all of them. Once any sequence is generating, a step evaluates chunks
        for about `PREFILL_SLICE_S` (at least one chunk), so a long prompt delays the others'
        next token by about that much, not by its whole length; several short prompts that
        arrive together are all read in one step. A chunk whose predicted time would carry
        the step past the slice waits for the next step, so a short prompt's tail read first
        does not add a long prompt's chunk to the same stall. Where splits are free, waiting
        prompts are read together, an equal piece of each per call (`_read_prompts_together`);
        elsewhere one per call (`_read_prompts_in_turn`)."""
        self.warm()
        done: list[tuple[JobContext, GenerationResult | None, BaseException | None]] = []
        for seq in list(self._seqs):
            if seq.ctx.cancelled():  # client left, time limit, shutdown: the slot frees now
                done.append(self._finish(seq, "cancelled"))
        self._compact()
        if self.bits_free:
            done += self._read_prompts_together()
        else:
            done += self._read_prompts_in_turn()
        if generating := self._generating():
            for group in self._decode_groups(generating):
                ran(len(group))
                done += self._decode_group(group)
        return done

    def _read_prompts_in_turn(self) -> list[tuple[JobContext, Any, BaseException | None]]:
        """A step's prompt reading where prompts may not share a call (their bits were not
        measured free of it): one prompt per call, in the pieces `_chunk_end` gives, the
        prompt served longest ago first."""
        done: list[tuple[JobContext, Any, BaseException | None]] = []
        started = time.monotonic()
        first = True
        for seq in sorted((s for s in self._seqs if s.pos < len(s.tokens)), key=lambda s: s.served):
            while seq.pos < len(seq.tokens) and seq in self._seqs:  # a failed chunk removes it
                if seq.ctx.cancelled():
                    done.append(self._finish(seq, "cancelled"))
                    break
                budget = None
                if self._generating():
                    budget = self.prefill_slice_s - (time.monotonic() - started)
                end = self._chunk_end(seq, budget)
                if not first and budget is not None and \
                        self._rate(seq) * (end - seq.pos) > budget + self._tail_allowance(((seq, end),)):
                    break
                first = False
                done += self._prefill(((seq, end),))
                seq.served = time.monotonic()
            if not first and self._generating() and time.monotonic() - started > self.prefill_slice_s:
                break
        return done

    def _read_prompts_together(self) -> list[tuple[JobContext, Any, BaseException | None]]:
        """A step's prompt reading where the bits allow it (`bits_free`):
        each call reads an equal piece of as many waiting prompts as the step's slice allows,
        those served longest ago first, in increasing slot order. llama.cpp reads equal pieces
        of consecutive sequences in one pass over the weights (`split_equal`), as llama-server
        reads every waiting prompt in one batch; measured on the 2-core AMX VM, four prompts of
        48 tokens read in one call took 559 ms against 574 ms in four calls, of 16 tokens 181
        against 206 ms (bench/bench_prompts.py), with the same bits."""
        done: list[tuple[JobContext, Any, BaseException | None]] = []
        started = time.monotonic()
        first = True
        while True:
            waiting = []
            for seq in sorted((s for s in self._seqs if s.pos < len(s.tokens)), key=lambda s: s.served):
                if seq.ctx.cancelled():
                    done.append(self._finish(seq, "cancelled"))
                else:
                    waiting.append(seq)
            if not waiting:
                return done
            budget = None
            if self._generating():
                budget = self.prefill_slice_s - (time.monotonic() - started)
            pieces = self._pieces(waiting, budget)
            cost = sum(self._rate(s) * (end - s.pos) for s, end in pieces)
            if not first and budget is not None and cost > budget + self._tail_allowance(pieces):
                return done
            first = False
            done += self._prefill(pieces)
            now = time.monotonic()
            for seq, _ in pieces:
                seq.served = now
            if self._generating() and now - started > self.prefill_slice_s:
                return done

    def _pieces(self, waiting: list[_Sequence], budget_s: float | None) -> list[tuple[_Sequence, int]]:
        """One call's prompt pieces, as (sequence, end) in slot order: the rows that fit the
        budget (`budget_s` left of the slice, None: no one is waiting for a token), at least
        MIN_PIECE, shared equally by the prompts served longest ago, at most `chunk` each."""
        rows = self._call_rows
        rate = max(self._rate(seq) for seq in waiting)
        if budget_s is not None and rate and budget_s / rate < rows:  # (an unbounded slice: all rows)
            rows = max(MIN_PIECE, int(budget_s / rate))
        take = waiting[:max(1, rows // MIN_PIECE)]
        size = min(self.chunk, max(MIN_PIECE, rows // len(take)))
        allowance = TAIL_SHARE * self.prefill_slice_s  # one for the call, not one per piece
        pieces = []
        for seq in take:
            end = min(len(seq.tokens), seq.pos + size)
            whole = self._without_short_tail(seq, end, budget_s, allowance)
            allowance -= self._rate(seq) * (whole - end)
            pieces.append((seq, whole))
        return sorted(pieces, key=lambda piece: piece[0].slot.index)

    def _tail_allowance(self, pieces: Sequence[tuple[_Sequence, int]]) -> float:
        """Seconds a call may run past the slice's budget: `TAIL_SHARE` of the slice when every
        piece in it ends its prompt (those get their first token in this step), else none."""
        if all(end == len(seq.tokens) for seq, end in pieces):
            return TAIL_SHARE * self.prefill_slice_s
        return 0.0

    def _without_short_tail(self, seq: _Sequence, end: int, budget_s: float | None,
                            allowance_s: float | None = None) -> int:
        """`end`, or the prompt's end when what would be left after `end` takes no more than
        `allowance_s` (default: `TAIL_SHARE` of the slice) and fits the piece limit."""
        rest = len(seq.tokens) - end
        if budget_s is None or rest <= 0 or end - seq.pos + rest > self.chunk:
            return end
        allowance_s = TAIL_SHARE * self.prefill_slice_s if allowance_s is None else allowance_s
        return len(seq.tokens) if self._rate(seq) * rest <= allowance_s else end

    def _generating(self) -> list[_Sequence]:
        return [s for s in self._seqs if s.pending is not None]

    def _chunk_end(self, seq: _Sequence, budget_s: float | None = None) -> int:
        """Where `seq`'s next prompt piece ends: at the next canonical boundary, or, where
        splits are free and others are waiting for their next token (`budget_s` left of the
        step's slice), after as many tokens as the budget allows (MIN_PIECE..chunk)."""
        start, chunk = seq.pos, self.chunk
        if self.splits_free:
            size = chunk
            rate = self._rate(seq)
            if budget_s is not None and rate:
                fits = budget_s / rate
                size = chunk if fits >= chunk else max(MIN_PIECE, int(fits))
            return self._without_short_tail(seq, min(len(seq.tokens), start + size), budget_s)
        return min(len(seq.tokens), (start // chunk + 1) * chunk if seq.repeatable else start + chunk)

    def _rate(self, seq: _Sequence) -> float:
        """Predicted prompt seconds per token for `seq`'s next piece (0 before any piece ran)."""
        return seq.s_per_token or self._prompt_s_per_token or 0.0

    def _prefill(self, pieces: Sequence[tuple[_Sequence, int]]) -> list[tuple[JobContext, Any, BaseException | None]]:
        """Evaluate each sequence's prompt from its position to its `end` in one call; a
        prompt that ends here gets its first token."""
        chunk = self.chunk
        began = time.monotonic()
        i = 0
        for seq, end in pieces:
            n, index = len(seq.tokens), seq.slot.index
            for pos in range(seq.pos, end):
                self._put(i, seq.tokens[pos], pos, index, pos == n - 1)
                i += 1
        self._batch.n_tokens = i
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            return [self._fail(seq, f"llama.cpp failed on the prompt (llama_decode returned {rc})")
                    for seq, _ in pieces]
        rate = (time.monotonic() - began) / i
        old = self._prompt_s_per_token
        self._prompt_s_per_token = rate if old is None else old + PROMPT_RATE_WEIGHT * (rate - old)
        done = []
        row = 0
        for seq, end in pieces:
            start = seq.pos
            row += end - start
            seq.s_per_token = rate
            seq.slot.history.extend(seq.tokens[start:end])
            if seq.repeatable:
                seq.slot.canonical = end // chunk * chunk
            seq.pos = end
            if end == len(seq.tokens):
                finished = self._take_token(seq, row - 1)
                if finished:
                    done.append(finished)
        return done

    def _decode_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """The decode calls of one step. Where rows are independent (the usual CPU case),
        one call for all. Where a row's bits depend on the batch, a repeatable sequence
        (greedy or seeded) gets a call of its own, so its tokens are the ones it gets alone;
        the others share one call."""
        # increasing sequence ids: llama.cpp splits a batch where they do not (see `_compact`)
        seqs = sorted(seqs, key=lambda seq: seq.slot.index)
        if self.rows_independent:
            return [seqs]
        shared = [seq for seq in seqs if not seq.repeatable]
        alone = [[seq] for seq in seqs if seq.repeatable]
        return alone + ([shared] if shared else [])

    def _decode_group(self, seqs: list[_Sequence]) -> list[tuple[JobContext, Any, BaseException | None]]:
        batch = self._batch
        for i, seq in enumerate(seqs):
            self._put(i, seq.pending, len(seq.slot.history), seq.slot.index, True)  # type: ignore[arg-type]
        batch.n_tokens = len(seqs)
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            return [self._fail(seq, f"llama.cpp failed (llama_decode returned {rc})") for seq in seqs]
        chosen = self._greedy_choices(seqs) if SAMPLE_TOGETHER else [None] * len(seqs)
        done = []
        for i, seq in enumerate(seqs):
            seq.slot.history.append(seq.pending)  # type: ignore[arg-type]
            finished = self._take_token(seq, i, chosen[i])
            if finished:
                done.append(finished)
        return done

    def _greedy_choices(self, seqs: list[_Sequence]) -> list[int | None]:
        """The tokens of a decode call's plain greedy rows (no sampler chain, no grammar, no
        log probabilities), chosen by one argmax over the call's logits; None for the rows
        left to `_take_token`. A row's logit bias is added in place first, as llama.cpp's
        logit-bias sampler adds it (the same float32 sums as on a copy, so the same token);
        nothing reads those rows again."""
        plain = [i for i, seq in enumerate(seqs)
                 if seq.sampler is None and seq.grammar is None and seq.logprobs is None]
        if not plain:
            return [None] * len(seqs)
        import numpy as np

        n, vocab = len(seqs), self._n_vocab
        rows_type = self._rows_types.get(n)
        if rows_type is None:
            rows_type = self._rows_types[n] = ctypes.c_float * (n * vocab)
        # every row of a decode call has logits, so output row i is batch row i
        logits = np.frombuffer(rows_type.from_address(
            ctypes.addressof(self._lib.llama_get_logits(self._ctx).contents)), dtype=np.float32).reshape(n, vocab)
        for i in plain:
            bias = seqs[i].bias
            if bias is not None:
                logits[i, bias[0]] += bias[1]
        picked = (logits if len(plain) == n else logits[plain]).argmax(axis=1).tolist()
        chosen: list[int | None] = [None] * n
        for i, token in zip(plain, picked, strict=True):
            chosen[i] = token
        return chosen

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _measure_row_independence(self) -> bool:
        """Decode distinct tokens alone and then together in batches of 2 to `slots` rows,
        and compare the logits bit for bit. llama.cpp's CPU matrix kernels compute each row
        by itself (true on the AVX2 path measured), but GEMM paths that tile rows (GPU
        kernels chosen by batch size, repacked CPU weights) need not."""
        import numpy as np

        lib, mem = self._lib, self._mem
        tokens = [(17 + 7919 * i) % self._n_vocab for i in range(self.slots)]
        alone = []
        for i, token in enumerate(tokens):
            self._put(0, token, 0, i, True)
            self._batch.n_tokens = 1
            if lib.llama_decode(self._ctx, self._batch) != 0:
                return False
            alone.append(self._row(0).copy())
            lib.llama_memory_seq_rm(mem, i, -1, -1)
        independent = True
        for size in sorted({2, 4, 8, self.slots} & set(range(2, self.slots + 1))):
            for i in range(size):
                self._put(i, tokens[i], 0, i, True)
            self._batch.n_tokens = size
            ok = lib.llama_decode(self._ctx, self._batch) == 0
            independent = independent and ok and all(
                np.array_equal(self._row(i), alone[i]) for i in range(size))
            for i in range(size):
                lib.llama_memory_seq_rm(mem, i, -1, -1)
        if independent and self._long_window_path and self.slots > 1:
            independent = self._long_rows_independent()
        log.info("decode rows are %s of the batch they ride in on this machine%s",
                 "independent" if independent else "NOT independent",
                 "" if independent else ": greedy and seeded requests are decoded one per call")
        return independent

    def _long_rows_independent(self) -> bool:
        """The same comparison past 256 tokens of context, where an f16 cache with flash
        attention gives a lone sequence's row another kernel path (its window of 512 cells is
        split over the threads) than the same row beside another sequence: one decode step of
        slot 0 after a 300-token prefix, alone and then beside slot 1's. Where the rows differ
        (measured on the 2-core Sapphire Rapids VM: logits up to 0.76 apart, enough to change
        a greedy answer), repeatable sequences are decoded one per call, always on the lone
        path. Costs one 300-token prompt read at load, for these caches only."""
        import numpy as np

        lib, mem, batch = self._lib, self._mem, self._batch
        length = min(300, self.ctx_per_slot - 2)
        if length <= 256:  # a window this small never reaches 512 cells
            return True
        prefix = [(41 + 3571 * i) % self._n_vocab for i in range(length)]
        token = (43 + 1223 * length) % self._n_vocab
        try:
            for start in range(0, length, self._call_rows):
                piece = prefix[start:start + self._call_rows]
                for i, t in enumerate(piece):
                    self._put(i, t, start + i, 0, False)
                batch.n_tokens = len(piece)
                if lib.llama_decode(self._ctx, batch) != 0:
                    return False
            rows = []
            for beside in (False, True):
                self._put(0, token, length, 0, True)
                if beside:
                    self._put(1, token, 0, 1, True)
                batch.n_tokens = 2 if beside else 1
                if lib.llama_decode(self._ctx, batch) != 0:
                    return False
                rows.append(self._row(0).copy())
                lib.llama_memory_seq_rm(mem, 0, length, -1)
                lib.llama_memory_seq_rm(mem, 1, -1, -1)
            return bool(np.array_equal(rows[0], rows[1]))
        finally:
            lib.llama_memory_seq_rm(mem, 0, -1, -1)
            lib.llama_memory_seq_rm(mem, 1, -1, -1)

    def _measure_split_independence(self) -> bool:
        """Read one prompt in pieces of 16, 16, 7 and 1 tokens (the last a decode step's
        shape), its first piece in one call with another prompt's 16 tokens (how
        `_read_prompts_together` reads), then whole, and compare the final logits bit for
        bit."""
        import numpy as np

        lib, mem, batch = self._lib, self._mem, self._batch
        tokens = [(29 + 6151 * i) % self._n_vocab for i in range(40)]
        other = [(31 + 4099 * i) % self._n_vocab for i in range(16)]
        finals = []
        for seq_id, plan in ((1, (16, 16, 7, 1)), (0, (40,))):
            pos = 0
            for size in plan:
                rows = 0
                if seq_id == 1 and pos == 0:  # beside another sequence's prompt, lower id first
                    for rows, token in enumerate(other, start=1):
                        self._put(rows - 1, token, rows - 1, 0, False)
                for i in range(size):
                    self._put(rows + i, tokens[pos + i], pos + i, seq_id, pos + i == len(tokens) - 1)
                batch.n_tokens = rows + size
                ok = lib.llama_decode(self._ctx, batch) == 0
                if rows:
                    lib.llama_memory_seq_rm(mem, 0, -1, -1)  # the other prompt: seq 0 reads next
                if not ok:
                    lib.llama_memory_seq_rm(mem, seq_id, -1, -1)
                    return False
                pos += size
            finals.append(self._row(size - 1).copy())
        for seq_id in (0, 1):
            lib.llama_memory_seq_rm(mem, seq_id, -1, -1)
        free = bool(np.array_equal(finals[0], finals[1]))
        log.info("prompt KV is %s of how a prompt is split on this machine%s", "independent" if free
                 else "NOT independent", ": the prefix cache reuses every cached token and waiting "
                 "prompts are read together" if free else ": repeatable prompts are read in canonical pieces")
        return free

    def _row(self, index: int) -> np.ndarray:
        import numpy as np

        return np.frombuffer(self._row_type.from_address(
            ctypes.addressof(self._get_logits(self._ctx, index).contents)), dtype=np.float32)

    def _take_token(self, seq: _Sequence, index: int,
                    token: int | None = None) -> tuple[JobContext, Any, BaseException | None] | None:
        """Sample the next token of `seq` from batch row `index` (unless `token` was already
        chosen, `_greedy_choices`); returns the request's end when this token ends it (end of
        generation, stop sequence, max_tokens)."""
        if token is not None:
            pass
        elif seq.sampler is None:
            row = self._row(index)
            if seq.bias is not None:
                row = row.copy()
                row[seq.bias[0]] += seq.bias[1]  # as llama.cpp's logit-bias sampler adds it
            token = int(row.argmax())
            if seq.grammar is not None:
                token = self._grammar_pick.greedy(seq.grammar, row, token)
                self._lib.llama_sampler_accept(seq.grammar, token)
        elif seq.grammar is not None:
            token = self._grammar_pick.sample(seq.grammar, seq.sampler.sampler, self._row(index))
        else:
            token = self._sample(seq.sampler.sampler, self._ctx, index)
        seq.pending = None
        if self._eog(self._vocab, token):
            return self._finish(seq, "stop")
        seq.generated += 1
        if seq.logprobs is not None:
            seq.ctx.emit(token_logprob(self._row(index), token, seq.logprobs, self._piece))
        piece = seq.text.push(self._piece(token))
        if piece:
            seq.ctx.emit(TextDelta(piece))
        if seq.text.stopped:
            return self._finish(seq, "stop")
        if seq.generated >= seq.max_tokens:
            return self._finish(seq, "length")
        seq.pending = token
        return None

    def _finish(self, seq: _Sequence, reason: str) -> tuple[JobContext, Any, BaseException | None]:
        self._release(seq)
        if reason == "cancelled" and seq.pos < len(seq.tokens):
            return seq.ctx, None, WorkStopped("stopped while evaluating the prompt")
        if reason != "cancelled":
            rest = seq.text.flush()
            if rest:
                seq.ctx.emit(TextDelta(rest))
        return seq.ctx, GenerationResult(
            finish_reason=reason, prompt_tokens=len(seq.tokens), completion_tokens=seq.generated,
            cached_tokens=seq.cached,
        ), None

    def _fail(self, seq: _Sequence, message: str) -> tuple[JobContext, Any, BaseException | None]:
        """A failed decode leaves the slot's KV unknown: forget it."""
        self._release(seq)
        self._lib.llama_memory_seq_rm(self._mem, seq.slot.index, -1, -1)
        seq.slot.history.clear()
        seq.slot.canonical = 0
        return seq.ctx, None, InferenceError(message)

    def abort_all(self, message: str) -> list[tuple[JobContext, Any, BaseException | None]]:
        """Fail every request in the batch and forget their slots' KV (after an unexpected
        error, when nothing about the context can be trusted)."""
        return [self._fail(seq, message) for seq in list(self._seqs)]

    def _release(self, seq: _Sequence) -> None:
        self._seqs.remove(seq)
        seq.slot.busy = False
        seq.slot.last_used = time.monotonic()
        seq.sampler = None  # LlamaSampler frees its chain when collected
        if seq.grammar is not None:
            self._lib.llama_sampler_free(seq.grammar)
            seq.grammar = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
