"""Embeddings from GGUF models on llama.cpp (its embedding mode), for ``/v1/embeddings``.

A GGUF bundle with ``task = "embedding"`` is loaded here instead of by the chat
backend (runtime/gguf/gguf_backend.py): one llama.cpp context in embedding mode,
pooled as the model says. Embedding GGUFs (bert, nomic-bert, bge ...) carry
``<arch>.pooling_type`` in their metadata and llama.cpp uses it; ``gguf.pooling``
in model.toml overrides it. A decoder model without one (a chat model run for
embeddings) gets mean pooling, which llama.cpp supports on decoders too.

Vectors are L2-normalized unless ``gguf.normalize = false`` (or the request says
otherwise), as the ONNX embedding backend does. Each input is embedded as its own
sequence, so a batch gives each input the vector it gets alone (to float rounding).
An input longer than the context is refused, never truncated silently.

llama.cpp's CPU "extra buffer types" (repacked weights) crash its embedding path
in the build we ship (a segfault in llama_decode with pooling on), so this
backend always loads without them; the chat backend keeps its own choice.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from runtime.backend import BackendBase, Capability, EmbeddingResult, JobContext, ModelInfo
from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings
from runtime.errors import InvalidInputError, ModelLoadError, WorkStopped
from runtime.gguf.gguf_backend import extra_buffer_types, gguf_placement

log = logging.getLogger(__name__)

#: model.toml's `gguf.pooling` -> llama.cpp's enum value
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}


def metadata_pooling(metadata: dict[str, str]) -> str | None:
    """The pooling a GGUF's metadata names (``<arch>.pooling_type``), or None."""
    arch = metadata.get("general.architecture", "")
    value = metadata.get(f"{arch}.pooling_type")
    by_value = {str(v): k for k, v in POOLING.items()}
    return by_value.get(str(value).strip()) if value is not None else None


def read_gguf_metadata(path: str) -> dict[str, str]:
    """A GGUF's metadata, read by llama.cpp without loading the weights (vocab only)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{path}: llama.cpp cannot read it: {exc}") from None
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


class GgufEmbeddingBackend(BackendBase):
    """One GGUF model in a llama.cpp context in embedding mode."""

    def __init__(self, bundle: ModelBundle, machine: MachineSettings) -> None:
        import llama_cpp

        options = bundle.manifest.gguf
        placement = gguf_placement(options, machine, allow_cpu_repack=False)
        pooling: str = options.pooling
        if pooling == "auto":
            pooling = metadata_pooling(read_gguf_metadata(str(bundle.weights))) or "mean"
        if pooling == "none" or pooling == "rank":
            raise ModelLoadError(f"{bundle.name}: gguf.pooling {pooling!r} gives no one vector per input; "
                                 "use mean, cls or last")
        self._normalize = options.normalize
        self.n_ctx = options.n_ctx
        try:
            with extra_buffer_types(False):
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(bundle.weights), embedding=True, pooling_type=POOLING[pooling],
                    n_ctx=options.n_ctx, n_batch=max(options.n_batch, options.n_ctx),
                    n_ubatch=max(options.n_batch, options.n_ctx), n_gpu_layers=placement.n_gpu_layers,
                    n_threads=placement.n_threads, n_threads_batch=placement.n_threads_batch,
                    flash_attn=options.flash_attn, verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{bundle.weights}: llama.cpp could not load it: {exc}") from exc
        log.info("%s: GGUF embeddings, %s pooling, %d tokens per input at most", bundle.name, pooling, self.n_ctx)
        self.info = ModelInfo(
            capabilities=frozenset({Capability.EMBEDDING}),
            platform="llama.cpp",
            context_length=self.n_ctx,
            embedding_dim=int(self._llm.n_embd()),
            placement=(*placement.reasons, f"embedding mode, {pooling} pooling"),
        )

    def embed(self, texts: list[str], normalize: bool | None, ctx: JobContext) -> EmbeddingResult:
        lengths = []
        for i, text in enumerate(texts):
            if not text:
                raise InvalidInputError(f"input[{i}] is empty", param="input")
            n = len(self._llm.tokenize(text.encode("utf-8"), add_bos=True))
            if n > self.n_ctx:
                raise InvalidInputError(
                    f"input[{i}] is {n} tokens; this model embeds at most {self.n_ctx} (gguf.n_ctx)", param="input")
            lengths.append(n)
        vectors = np.empty((len(texts), self.info.embedding_dim or 0), dtype=np.float32)
        for i, text in enumerate(texts):  # one sequence each: a batch gives what each input gets alone
            if ctx.cancelled():
                raise WorkStopped("stopped between inputs")
            vectors[i] = np.asarray(self._llm.embed(text, normalize=False, truncate=False), dtype=np.float32)
        if self._normalize if normalize is None else normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms == 0, 1.0, norms)
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(lengths), input_tokens=tuple(lengths))

    def close(self) -> None:
        self._llm.close()
