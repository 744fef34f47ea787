"""GGUF language models on llama.cpp, through llama-cpp-python.

Chat prompts are rendered with the model's own Jinja template (from the GGUF
metadata, as llama-cpp-python's `create_chat_completion` does) and tokenized
here, so the prompt length is known before generation starts: a prompt that
cannot fit is refused with `ContextLengthExceededError` instead of being
silently truncated. A request with a seed bypasses the prompt cache so that it
repeats exactly. Generation always streams internally; a stopping
criterion checks the job's cancel flag after every sampled token, which is how
a client that hangs up stops the model rather than just the socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

from .backend import (
    BackendBase,
    Capability,
    GenerationRequest,
    GenerationResult,
    JobContext,
    ModelInfo,
    TextDelta,
)
from .bundle import ModelBundle
from .devices import MachineSettings, choose_llama_placement, llama_gpu_offload_supported
from .errors import ContextLengthExceededError, InferenceError, ModelLoadError

log = logging.getLogger(__name__)

# Llama() has no argument for use_extra_bufts; it reads llama_model_default_params()
# inside __init__. Loads that need a different default are serialised on this lock.
_PARAMS_LOCK = threading.Lock()

#: Sampling defaults of llama-cpp-python's create_chat_completion, kept so that
#: a request through the agent samples exactly as an in-process call would.
LLAMA_SAMPLING_DEFAULTS: dict[str, Any] = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


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


class GgufBackend(BackendBase):
    """One GGUF model in one llama.cpp context."""

    def __init__(self, bundle: ModelBundle, machine: MachineSettings) -> None:
        import llama_cpp

        options = bundle.manifest.gguf
        placement = choose_llama_placement(
            machine.cpu,
            gpu_offload_supported=llama_gpu_offload_supported(),
            requested_gpu_layers=options.n_gpu_layers,
            requested_threads=machine.threads,
            allow_cpu_repack=machine.cpu_repack,
        )
        log.info("loading %s (%s): %s", bundle.name, bundle.weights.name, "; ".join(placement.reasons))
        self.placement = placement
        try:
            with extra_buffer_types(placement.use_extra_bufts):
                self._llm = llama_cpp.Llama(
                    model_path=str(bundle.weights),
                    n_ctx=options.n_ctx,
                    n_batch=options.n_batch,
                    n_gpu_layers=placement.n_gpu_layers,
                    n_threads=placement.n_threads,
                    n_threads_batch=placement.n_threads_batch,
                    flash_attn=options.flash_attn,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{bundle.weights}: llama.cpp could not load it: {exc}") from exc
        self._formatter = self._chat_formatter(options.chat_template)
        self._sampled = 0
        self._count_generated_tokens()
        capabilities = {Capability.COMPLETION}
        if self._formatter is not None:
            capabilities.add(Capability.CHAT)
        self.info = ModelInfo(
            capabilities=frozenset(capabilities),
            platform="llama.cpp",
            context_length=self._llm.n_ctx(),
            placement=placement.reasons,
        )

    def _count_generated_tokens(self) -> None:
        """Wrap this instance's token generator to count what it yields.

        create_completion reports no usage when streaming; counting the tokens it
        consumes from `generate` (end-of-generation tokens excluded) gives the
        same figure it reports when not streaming.
        """
        import llama_cpp

        original = self._llm.generate
        vocab = self._llm._model.vocab

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            for token in original(*args, **kwargs):
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    self._sampled += 1
                yield token

        self._llm.generate = generate  # type: ignore[method-assign,assignment]

    def _chat_formatter(self, override: str | None) -> Any:
        from llama_cpp import llama_chat_format

        template = override or self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        model = self._llm._model
        eos_id, bos_id = self._llm.token_eos(), self._llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str], Any]:
        """Tokens of the prompt, extra stop strings and stopping criteria from the template."""
        if request.messages is not None:
            result = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in request.messages]
            )
            tokens = self._llm.tokenize(
                result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
            )
            stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
            return tokens, stops, result.stopping_criteria
        if isinstance(request.prompt, list):
            return list(request.prompt), [], None
        # What create_completion does with a text prompt: BOS, then the text.
        return self._llm.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=True), [], None

    def generate(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult:
        import llama_cpp

        if request.messages is not None and self._formatter is None:
            raise InferenceError("this model has no chat template; use /v1/completions")
        tokens, template_stops, template_criteria = self._prompt_tokens(request)
        n_ctx = self._llm.n_ctx()
        if len(tokens) >= n_ctx or (
            request.max_tokens is not None and len(tokens) + request.max_tokens > n_ctx
        ):
            raise ContextLengthExceededError(n_ctx, len(tokens), request.max_tokens)
        max_tokens = request.max_tokens if request.max_tokens is not None else n_ctx - len(tokens)

        self._sampled = 0
        if request.seed is not None:
            # Reusing a cached prompt prefix evaluates the last prompt token in a batch of
            # one, whose logits differ in the last bits from a full-prompt batch; a seeded
            # request evaluates its whole prompt so the same request repeats exactly.
            self._llm.reset()

        def stop_when_cancelled(input_ids: Any, logits: Any) -> bool:
            if template_criteria is not None and template_criteria(input_ids, logits):
                return True
            return ctx.cancelled()

        finish_reason = "length"
        try:
            chunks: Iterator[Any] = self._llm.create_completion(  # type: ignore[assignment]
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=list(request.stop) + template_stops,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                logit_bias=request.logit_bias or None,
                stopping_criteria=llama_cpp.StoppingCriteriaList([stop_when_cancelled]),
                stream=True,
                **LLAMA_SAMPLING_DEFAULTS,
            )
            for chunk in chunks:
                choice = chunk["choices"][0]
                if choice["text"]:
                    ctx.emit(TextDelta(choice["text"]))
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if ctx.cancelled():
                    finish_reason = "cancelled"
                    break
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(f"llama.cpp failed: {exc}") from exc
        if ctx.cancelled():
            finish_reason = "cancelled"
        return GenerationResult(
            finish_reason=finish_reason, prompt_tokens=len(tokens), completion_tokens=self._sampled
        )

    def close(self) -> None:
        self._llm.close()
