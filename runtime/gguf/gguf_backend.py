"""GGUF language models on llama.cpp, through llama-cpp-python.

Chat prompts are rendered with the model's own Jinja template (from the GGUF
metadata, as llama-cpp-python's `create_chat_completion` does) and tokenized
here, so the prompt length is known before generation starts: a prompt that
cannot fit is refused with `ContextLengthExceededError` instead of being
silently truncated. A template that knows tools gets a chat with tools in its own terms
(OpenAI's messages and tools), and the answer its own call grammar (runtime/gguf/chat_formats.py);
the prompt as rendered is logged at debug level.

The prompt is evaluated here too (`_prefill`), so that the same request gives
the same tokens whatever ran before it: see `_prefill` and the determinism rule
in docs/architecture.md.

Tokens come from `Llama.generate` with the same sampler settings
`create_completion` uses, so the tokens are the same; the text is built here
one token piece at a time (`TextStream`) instead of by `create_completion`'s
stream, which re-detokenizes the whole completion at every token. That keeps
the model thread's per-token Python work small, which is what pays for the
HTTP side on a 2-core machine. The job's cancel flag is checked at every
token, so a client that hangs up stops the model rather than just the socket.

Long prompts are tokenized in pieces (`_tokenize`), cut just before special-token
text: llama.cpp's tokenizer with special tokens parsed is quadratic in their
number within one call, and pieces let the cancel flag and the context size be
checked as it goes. Cutting there gives exactly the tokens of one call, because
llama.cpp splits the text at special tokens first and tokenizes the text between
them separately.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import random
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from runtime.backend import (
    BackendBase,
    Capability,
    GenerationRequest,
    GenerationResult,
    JobContext,
    ModelInfo,
    TextDelta,
)
from runtime.bundle import GgufOptions, ModelBundle
from runtime.devices import LlamaPlacement, MachineSettings, choose_llama_placement, llama_gpu_offload_supported
from runtime.errors import (
    ContextLengthExceededError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    UnsupportedOperationError,
    WorkStopped,
)
from runtime.gguf import chat_formats
from runtime.gguf.gguf_batch import BatchEngine, token_logprob
from runtime.gguf.llama_params import LLAMA_SAMPLING_DEFAULTS, PreparedPrompt, kv_bytes_per_token, kv_cache_args
from runtime.gguf.text_stream import TextStream
from runtime.scheduling.batching import KV_MEMORY_SHARE, choose_ctx_per_slot, choose_slots, fit_slots
from runtime.tuning.settings import apply_tuning

log = logging.getLogger(__name__)

# Llama() has no argument for use_extra_bufts; it reads llama_model_default_params()
# inside __init__. Loads that need a different default are serialised on this lock.
_PARAMS_LOCK = threading.Lock()

@contextlib.contextmanager
def extra_buffer_types(use_extra_bufts: bool) -> Iterator[None]:
    """Within this block, llama_cpp.Llama() loads with `use_extra_bufts` as given.

    Public so that benchmarks and tests build their in-process baseline exactly as the
    agent does (and do not crash on AMX machines).
    """
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = lib.llama_model_default_params
    has_field = any(field[0] == "use_extra_bufts" for field in lib.llama_model_params._fields_)
    if not has_field and not use_extra_bufts:
        log.warning("this llama-cpp-python has no use_extra_bufts model parameter, so CPU "
                    "weight repacking cannot be turned off; upgrade llama-cpp-python")
    with _PARAMS_LOCK:
        if has_field and not use_extra_bufts:

            def patched() -> Any:
                params = original()
                params.use_extra_bufts = False
                return params

            lib.llama_model_default_params = patched
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def _logit_bias_processor(bias: dict[int, float]) -> Any:
    """OpenAI's logit_bias as llama-cpp-python applies it (added to the raw logits)."""
    if not bias:
        return None
    import llama_cpp
    import numpy as np

    ids = np.fromiter(bias.keys(), dtype=np.intc)
    values = np.fromiter(bias.values(), dtype=np.single)

    def apply(input_ids: Any, scores: Any) -> Any:
        scores = np.copy(scores)
        scores[ids] += values
        return scores

    return llama_cpp.LogitsProcessorList([apply])


CPU_PROMPT_CHUNK = 64
#: Context of the llama_cpp.Llama wrapper when the batching engine has the real one.
WRAPPER_CTX = 64


#: Prompts up to this many bytes are tokenized in one call (a few milliseconds at most).
TOKENIZE_WHOLE_BYTES = 16_384
#: Special tokens per tokenizer call when a prompt is tokenized in pieces.
SPECIALS_PER_PIECE = 64


def prompt_chunk(options: GgufOptions, placement: LlamaPlacement) -> int:
    """Tokens per prompt piece: small on the CPU, where prompt speed barely depends on it and
    small pieces let the prefix cache reuse more; a whole batch on a GPU, which needs it."""
    if options.prompt_chunk != "auto":
        return options.prompt_chunk
    return options.n_batch if placement.n_gpu_layers != 0 else min(CPU_PROMPT_CHUNK, options.n_batch)


def gguf_placement(options: GgufOptions, machine: MachineSettings,
                   allow_cpu_repack: bool | None = None) -> LlamaPlacement:
    """Where and how a GGUF model runs here, before tuning: one rule for the chat backend,
    the embedding backend (which passes its own repack rule) and tuning's baseline, so the
    settings tuning measures against are the ones a load really uses. Blocking: asks
    llama.cpp about GPU offload."""
    return choose_llama_placement(
        machine.cpu,
        gpu_offload_supported=llama_gpu_offload_supported(),
        requested_gpu_layers=options.n_gpu_layers,
        requested_threads=machine.threads,
        allow_cpu_repack=machine.cpu_repack if allow_cpu_repack is None else allow_cpu_repack,
    )


class GgufBackend(BackendBase):
    """One GGUF model in one llama.cpp context."""

    def __init__(self, bundle: ModelBundle, machine: MachineSettings) -> None:
        import llama_cpp

        options = bundle.manifest.gguf
        placement = gguf_placement(options, machine)
        # settings measured on this machine (runtime/tuning/) for every knob the bundle and config leave open
        options, placement, self.tuning = apply_tuning(
            machine.tuning, bundle, options, placement, machine, prompt_chunk(options, placement))
        log.info("loading %s (%s): %s", bundle.name, bundle.weights.name, "; ".join(placement.reasons))
        self.placement = placement
        gpu = placement.n_gpu_layers != 0
        slots = choose_slots(machine.batching, gpu)
        #: Context one request may use: the whole context, or a slot's share when batching.
        self.n_ctx = choose_ctx_per_slot(machine.batching, options.n_ctx) if slots > 1 else options.n_ctx
        self._weights, self._options = bundle.weights, options
        # With continuous batching the engine has a context of its own; this one only
        # tokenizes, so it gets the smallest KV cache llama.cpp accepts.
        self._llm = self._open(self.n_ctx if slots == 1 else WRAPPER_CTX)
        #: Prompts are evaluated in chunks of this many tokens aligned to position 0.
        self._chunk = min(options.n_batch, prompt_chunk(options, placement))
        #: Leading KV positions whose values came from whole aligned chunks (reusable).
        self._canonical = 0
        self._formatter = self._chat_formatter(options.chat_template)
        #: How this model writes tool calls: its template's own format, or the generic one.
        self.tool_format = chat_formats.detect(self._template) if self._formatter is not None else chat_formats.GENERIC
        if self.tool_format != chat_formats.GENERIC:
            log.info("%s: the chat template knows tools; tool calls use its %s format", bundle.name,
                     self.tool_format)
        self._vocab = self._llm._model.vocab
        self._special_text = self._special_token_pattern(llama_cpp)
        self._token_to_piece = llama_cpp.llama_token_to_piece
        self._piece_buf = ctypes.create_string_buffer(64)
        capabilities = {Capability.COMPLETION}
        if self._formatter is not None:
            capabilities.add(Capability.CHAT)
        #: Continuous batching (runtime/gguf/gguf_batch.py); None: one request at a time.
        self.engine: BatchEngine | None = None
        reasons = placement.reasons
        if slots > 1:
            self.engine, why = self._batch_engine(slots, options.flash_attn, gpu)
            reasons = (*reasons, why)
            if self.engine is None:  # could not batch: serve one at a time in a whole context
                self._llm.close()
                self.n_ctx = options.n_ctx
                self._llm = self._open(self.n_ctx)
                self._vocab = self._llm._model.vocab
        else:
            reasons = (*reasons, "continuous batching off (batching.gguf_slots = 1): one request at a time")
        log.info("%s: %s", bundle.name, reasons[-1])
        self.info = ModelInfo(
            capabilities=frozenset(capabilities),
            platform="llama.cpp",
            context_length=self.n_ctx,
            placement=reasons,
            tool_format=self.tool_format,
        )

    def _open(self, n_ctx: int) -> Any:
        """The model in a llama_cpp.Llama of `n_ctx` tokens, placed as chosen."""
        import llama_cpp

        placement, options = self.placement, self._options
        try:
            with extra_buffer_types(placement.use_extra_bufts):
                return llama_cpp.Llama(
                    model_path=str(self._weights),
                    n_ctx=n_ctx,
                    n_batch=options.n_batch,
                    n_gpu_layers=placement.n_gpu_layers,
                    n_threads=placement.n_threads,
                    n_threads_batch=placement.n_threads_batch,
                    flash_attn=options.flash_attn,
                    **kv_cache_args(options.kv_type),
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{self._weights}: llama.cpp could not load it: {exc}") from exc

    def _batch_engine(self, slots: int, flash_attn: bool, gpu: bool) -> tuple[BatchEngine | None, str]:
        """The continuous-batching engine with as many of `slots` as fit: on a CPU the KV cache
        of all slots must fit in `KV_MEMORY_SHARE` of the memory available now; on a GPU,
        llama.cpp says whether it fits (fewer slots are tried when it cannot)."""
        slot_bytes = self.n_ctx * kv_bytes_per_token(self._llm, self._options.kv_type)
        if not gpu:
            import psutil

            fitting = fit_slots(slots, slot_bytes, int(psutil.virtual_memory().available * KV_MEMORY_SHARE))
            if fitting < slots:
                log.warning("KV cache for %d slots of %d tokens (%d MiB) does not fit in %d%% of the "
                            "memory available; using %d slots", slots, self.n_ctx, slots * slot_bytes >> 20,
                            int(KV_MEMORY_SHARE * 100), fitting)
                slots = fitting
        while slots > 1:
            try:
                engine = BatchEngine(self, slots, self.n_ctx, flash_attn, self._options.kv_type)
            except InferenceError as exc:
                log.warning("%s; trying %d slots", exc, slots // 2)
                slots //= 2
                continue
            return engine, (f"continuous batching: {slots} slots of {self.n_ctx} tokens "
                            f"(KV cache {slots * slot_bytes >> 20} MiB)")
        return None, "continuous batching off: one request at a time"

    def _special_token_pattern(self, llama_cpp: Any) -> re.Pattern[str] | None:
        """A regex matching the text of every control / user-defined token, longest first."""
        flags = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = {
            self._llm._model.token_get_text(token)
            for token in range(self._llm.n_vocab())
            if llama_cpp.llama_vocab_get_attr(self._vocab, token) & flags
        }
        texts.discard("")
        if not texts:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))

    def _pieces(self, text: str) -> list[str]:
        """`text` cut just before every SPECIALS_PER_PIECE-th special-token occurrence."""
        if self._special_text is None:
            return [text]
        cuts = [m.start() for i, m in enumerate(self._special_text.finditer(text))
                if i and i % SPECIALS_PER_PIECE == 0]
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def _tokenize(self, text: str, add_bos: bool, max_tokens: int | None, ctx: JobContext) -> list[int]:
        """Tokens of `text` (special tokens parsed), as one llama.cpp call would give them.

        Long text goes in pieces: between pieces the cancel flag is checked, and once the
        tokens cannot fit the context the prompt is refused without reading the rest."""
        data = text.encode("utf-8")
        if len(data) <= TOKENIZE_WHOLE_BYTES:
            return self._llm.tokenize(data, add_bos=add_bos, special=True)
        n_ctx = self.n_ctx
        tokens: list[int] = []
        for i, piece in enumerate(self._pieces(text)):
            if ctx.cancelled():
                raise WorkStopped("stopped while tokenizing the prompt")
            tokens += self._llm.tokenize(piece.encode("utf-8"), add_bos=add_bos and i == 0, special=True)
            if len(tokens) >= n_ctx:
                raise ContextLengthExceededError(n_ctx, len(tokens), max_tokens, at_least=True)
        return tokens

    def _chat_formatter(self, override: str | None) -> Any:
        import jinja2
        from llama_cpp import llama_chat_format

        template = override or self._llm.metadata.get("tokenizer.chat_template")
        self._template: str | None = template
        if not template:
            return None
        model = self._llm._model
        eos_id, bos_id = self._llm.token_eos(), self._llm.token_bos()
        try:
            return llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )
        except jinja2.TemplateError as exc:
            where = "the bundle's chat_template" if override else "the GGUF's tokenizer.chat_template"
            line = f" (line {exc.lineno})" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
            raise ModelLoadError(f"{self._weights}: {where} is not a valid Jinja template{line}: "
                                 f"{exc.message or exc}") from None

    def _render_chat(self, request: GenerationRequest) -> tuple[Any, str | None]:
        """The chat through the model's template, and the grammar the answer keeps to.

        A chat with tools for a template that knows them goes in the template's own terms
        (OpenAI's messages and tools, as llama-server passes them); any other chat goes as
        the HTTP layer wrote it (tools in the generic format: runtime/gguf/tool_calls.py). A
        template that raises on the chat (its `raise_exception`) refuses the request (400);
        any other template error is the model's fault (500)."""
        import jinja2

        assert request.messages is not None
        tools = request.tools
        native = tools is not None and self.tool_format != chat_formats.GENERIC
        grammar = request.grammar
        try:
            if tools is not None and native:
                shown = tools.choice != "none" and bool(tools.tools)
                result = self._formatter(messages=[dict(m) for m in tools.messages],
                                         tools=chat_formats.template_tools(list(tools.tools)) if shown else None,
                                         **chat_formats.template_options(self.tool_format))
                if shown:
                    grammar = chat_formats.grammar(self.tool_format, list(tools.tools), tools.choice, tools.named,
                                                   tools.parallel)
            else:
                result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in request.messages])
        except ValueError as exc:  # raise_exception() in the template: it refuses this chat
            raise InvalidInputError(f"the model's chat template refused the messages: {exc}",
                                    param="messages") from None
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise InferenceError(f"the model's chat template failed on this chat: "
                                 f"{type(exc).__name__}: {exc}") from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chat prompt (%s tool format, %s): %r", self.tool_format if native else chat_formats.GENERIC,
                      "tools in the template" if native else "as written", result.prompt)
        return result, grammar

    def _prompt_tokens(self, request: GenerationRequest,
                       ctx: JobContext) -> tuple[list[int], list[str], str | None]:
        """Tokens of the prompt, extra stop strings from the template, and the grammar.

        The template's own stopping criterion only watches for the end-of-sequence
        token, which the decode loop stops on already (every end-of-generation token).
        """
        if request.messages is not None:
            result, grammar = self._render_chat(request)
            tokens = self._tokenize(result.prompt, not result.added_special, request.max_tokens, ctx)
            stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
            return tokens, stops, grammar
        if isinstance(request.prompt, list):
            self._check_token_ids(request.prompt, "prompt")
            return list(request.prompt), [], request.grammar
        # What create_completion does with a text prompt: BOS (if the model uses one), then the text.
        return self._tokenize(request.prompt or "", True, request.max_tokens, ctx), [], request.grammar

    def _check_token_ids(self, ids: Iterable[int], param: str) -> None:
        n_vocab = self._llm.n_vocab()
        outside = next((t for t in ids if not 0 <= t < n_vocab), None)
        if outside is not None:
            raise InvalidInputError(
                f"token id {outside} is outside the model's vocabulary (0 to {n_vocab - 1})", param=param
            )

    def prepare(self, request: GenerationRequest, ctx: JobContext) -> PreparedPrompt:
        """Check `request` and tokenize its prompt for a request's context (`n_ctx`): what the
        one-at-a-time path and the batching engine (runtime/gguf/gguf_batch.py) both start from."""
        n_ctx = self.n_ctx
        if request.messages is not None and self._formatter is None:
            raise UnsupportedOperationError("this model has no chat template; use /v1/completions")
        self._check_token_ids(request.logit_bias, "logit_bias")
        tokens, template_stops, grammar = self._prompt_tokens(request, ctx)
        if not tokens:
            raise InvalidInputError("the prompt is empty: there is nothing to continue", param="prompt")
        if len(tokens) >= n_ctx or (
            request.max_tokens is not None and len(tokens) + request.max_tokens > n_ctx
        ):
            raise ContextLengthExceededError(n_ctx, len(tokens), request.max_tokens)
        max_tokens = request.max_tokens if request.max_tokens is not None else n_ctx - len(tokens)
        return PreparedPrompt(tokens, list(request.stop) + template_stops, max_tokens, grammar)

    def generate(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult:
        """One request, run to its end on the calling thread: in the batching engine when
        there is one (nothing else may step it meanwhile; the scheduler steps it for
        requests that come through the agent), else alone in the model's own context."""
        import llama_cpp

        if self.engine is not None:
            return self.engine.run(request, ctx)
        prepared = self.prepare(request, ctx)
        tokens, max_tokens = prepared.tokens, prepared.max_tokens
        grammar = None
        if prepared.grammar:  # refused here, before the prompt is read, if llama.cpp cannot parse it
            from llama_cpp.llama_grammar import LlamaGrammar

            from runtime.gguf.gguf_batch import grammar_sampler

            llama_cpp.llama_sampler_free(grammar_sampler(llama_cpp, self._vocab, prepared.grammar))
            grammar = LlamaGrammar.from_string(prepared.grammar, verbose=False)
        row = None
        if request.logprobs is not None:
            import numpy as np

            n_vocab = self._llm.n_vocab()
            row_type = ctypes.c_float * n_vocab

            def row() -> Any:  # the logits of the last decode, which the token was sampled from
                pointer = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
                return np.frombuffer(row_type.from_address(ctypes.addressof(pointer.contents)),
                                     dtype=np.float32)

        if request.seed is not None:
            self._llm.set_seed(request.seed)
        else:
            self._llm.set_seed(random.Random(self._llm._seed).randint(0, 2**32))
        try:
            cached = self._prefill(tokens, ctx, repeatable=request.temperature == 0 or request.seed is not None)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"llama.cpp failed on the prompt: {exc}") from exc
        if cached is None:  # stopped (client left, time limit, shutdown) while reading the prompt
            raise WorkStopped("stopped while evaluating the prompt")

        text = TextStream(prepared.stops)
        is_eog, vocab = llama_cpp.llama_vocab_is_eog, self._vocab
        generated = 0
        finish_reason = "length"
        stopped = False
        try:
            # The prompt is in the KV cache and its last logits are fresh: generate from here.
            for token in self._llm.generate(
                [],
                reset=False,
                temp=request.temperature,
                top_p=request.top_p,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                logits_processor=_logit_bias_processor(request.logit_bias),
                grammar=grammar,
                **LLAMA_SAMPLING_DEFAULTS,
            ):
                if ctx.cancelled():  # client left, time limit, shutdown: stop before the next decode
                    stopped = True
                    break
                if is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                generated += 1
                if row is not None:
                    ctx.emit(token_logprob(row(), token, request.logprobs or 0, self.piece))
                piece = text.push(self.piece(token))
                if piece:
                    ctx.emit(TextDelta(piece))
                if text.stopped:
                    finish_reason = "stop"
                    break
                if generated >= max_tokens:
                    break
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"llama.cpp failed: {exc}") from exc
        rest = text.flush()
        if rest and not stopped:
            ctx.emit(TextDelta(rest))
        if stopped:
            finish_reason = "cancelled"  # the interface says why, from Job.stop_reason
        return GenerationResult(
            finish_reason=finish_reason, prompt_tokens=len(tokens), completion_tokens=generated,
            cached_tokens=cached,
        )

    def _prefill(self, tokens: list[int], ctx: JobContext, repeatable: bool = True) -> int | None:
        """Evaluate the prompt so that, when asked, its logits do not depend on what ran before.

        llama.cpp's logits for a token can differ in the last bits with the shape of
        the batch that computed it (kernels for one row and for many differ, and on
        some CPUs, AMX ones among them, greedy choices flip on those bits). So a
        `repeatable` prompt (temperature 0 or a seed) is evaluated as a fresh context
        with `n_batch = chunk` would: in chunks of `chunk` tokens aligned to position 0.
        The prefix cache reuses only whole chunks that were themselves evaluated that
        way (never tokens generated one at a time, never a partial chunk), and always
        re-evaluates the chunk holding the final prompt token. Each KV position is then
        computed from the same inputs by the same kernel as in a fresh run, bit for bit;
        llama.cpp keeps cell i at position i for a single sequence, so attention sums run
        in the same order too.

        A sampled request without a seed has no answer to repeat, so it reuses every
        cached token (the next turn of a chat skips the previous answer too); positions
        it evaluates are not reused by repeatable requests later.

        The cancel flag is checked between chunks, so a long prompt whose client left
        stops within one chunk. Returns how many prompt tokens came from the cache, or
        None when it stopped that way.
        """
        llm, chunk = self._llm, self._chunk
        n = len(tokens)
        limit = min(llm.n_tokens, n - 1, self._canonical if repeatable else n)
        mismatch = (llm.input_ids[:limit] != tokens[:limit]).nonzero()[0]
        same = int(mismatch[0]) if mismatch.size else limit
        keep = same // chunk * chunk if repeatable else same
        self._canonical = min(self._canonical, keep) // chunk * chunk
        llm.n_tokens = keep  # eval() drops KV from here on before decoding
        step = chunk if repeatable else llm.n_batch
        for start in range(keep, n, step):
            if ctx.cancelled():
                return None
            llm.eval(tokens[start:start + step])
            if repeatable:
                self._canonical = min(start + step, n) // chunk * chunk
        return keep

    # ---- what the batching engine reads (runtime/gguf/gguf_batch.py's `BatchModel`) ----------

    @property
    def llm(self) -> Any:
        """The llama_cpp.Llama wrapper: weights, tokenizer, chat template."""
        return self._llm

    @property
    def chunk(self) -> int:
        """Prompts are evaluated in chunks of this many tokens aligned to position 0."""
        return self._chunk

    @property
    def n_batch(self) -> int:
        """The bundle's n_batch (not the tokenizing wrapper's, whose context is tiny)."""
        return self._options.n_batch

    @property
    def vocab(self) -> Any:
        """llama.cpp's vocabulary handle (end-of-generation tokens are asked of it)."""
        return self._vocab

    def piece(self, token: int) -> bytes:
        """The bytes of one token, as llama-cpp-python's detokenize produces them (special
        tokens as empty text, as in generation)."""
        size = self._token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if size < 0:  # longer than the buffer: grow it once and retry
            self._piece_buf = ctypes.create_string_buffer(-size)
            size = self._token_to_piece(self._vocab, token, self._piece_buf, -size, 0, False)
        return self._piece_buf.raw[:size]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self._llm.close()
