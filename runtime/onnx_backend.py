"""ONNX models on onnxruntime: raw tensors for anything, sentence embeddings when a
tokenizer comes with the bundle.

Input checking happens here, against the model's own declared names, dtypes and
shapes, so a wrong request is a precise `InvalidInputError` rather than an
onnxruntime stack trace. Embeddings follow sentence-transformers: tokenize with
the bundle's tokenizer.json, run, mean-pool over the attention mask (or take the
CLS token), optionally L2-normalise.

Memory: a request runs as micro-batches that fit the model's memory budget
(runtime/scheduling/working_set.py): texts sorted by length and padded per micro-batch, KServe
tensors split along their batch dimension when every input and output has a free
first dimension. The job's cancel flag is checked between micro-batches.

onnxruntime's own log is switched off (severity FATAL, for the process and for each
session): it wrote raw coloured lines to stderr, outside the agent's log, for errors it
also raises to us, which we report in our words (a request's error, the agent's log).

Giving memory back: sessions share one CPU arena registered for the process with
``arena_extend_strategy = kSameAsRequested`` (each allocation its own region),
and runs whose working set is large ask for it to be shrunk afterwards (run option
``memory.enable_memory_arena_shrinkage``); small runs keep it warm. With
onnxruntime's default arena (regions grown in powers of two) shrinking freed
almost nothing after a warm-up: a [64, 512] request kept 516 MB; this way it keeps
about 45 MB, for runs about 20% slower on large batches and no slower on small ones
(docs/configuration.md). Without an arena, large runs were 70% slower and glibc kept
200-300 MB.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.backend import (
    BackendBase,
    Capability,
    EmbeddingResult,
    JobContext,
    ModelInfo,
    TensorSpec,
)
from runtime.bundle import ModelBundle
from runtime.devices import MachineSettings, choose_onnx_placement, onnx_available_providers
from runtime.errors import InferenceError, InvalidInputError, ModelLoadError, WorkingSetTooLargeError, WorkStopped
from runtime.scheduling.working_set import MB, WorkingSetModel, length_sorted_batches, rows_that_fit

log = logging.getLogger(__name__)

#: onnxruntime type strings -> numpy dtype names.
ONNX_TO_NUMPY: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


#: Runs estimated above this many bytes give their arena memory back afterwards.
SHRINK_ABOVE_BYTES = 32 * MB


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


#: Returns the C heap's free pages to the system: glibc keeps what threads freed (the
#: tokenizer's and onnxruntime's worker threads each have a heap) until asked.
MALLOC_TRIM = _malloc_trim()

_ARENA_LOCK = threading.Lock()


@functools.cache
def _register_shared_cpu_arena(ort: Any) -> None:
    """Once per process: a CPU arena whose regions are as large as each request."""
    same_as_requested = 1  # OrtArenaCfg: 0 kNextPowerOfTwo, 1 kSameAsRequested
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, same_as_requested, -1, -1))


#: onnxruntime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
ORT_LOG_FATAL = 4


@functools.cache
def _quiet_default_logger(ort: Any) -> None:
    """Once per process: onnxruntime's process-wide logger reports only fatal errors."""
    ort.set_default_logger_severity(ORT_LOG_FATAL)


def _use_shared_cpu_arena(ort: Any, session_options: Any) -> None:
    """Make the session allocate from the process's shared CPU arena, so that shrinking
    it after a large run frees what that run took."""
    with _ARENA_LOCK:  # functools.cache does not stop two threads from both registering
        _register_shared_cpu_arena(ort)
    session_options.add_session_config_entry("session.use_env_allocators", "1")


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
    return TensorSpec(name=node.name, dtype=ONNX_TO_NUMPY.get(node.type, node.type), shape=shape)


class OnnxBackend(BackendBase):
    """One onnxruntime InferenceSession, plus a tokenizer when the bundle has one."""

    def __init__(self, bundle: ModelBundle, machine: MachineSettings) -> None:
        import onnxruntime as ort

        options = bundle.manifest.onnx
        placement = choose_onnx_placement(
            machine.cpu, onnx_available_providers(), options.providers, machine.threads
        )
        log.info("loading %s (%s): %s", bundle.name, bundle.weights.name, "; ".join(placement.reasons))
        _quiet_default_logger(ort)
        session_options = ort.SessionOptions()
        session_options.log_severity_level = ORT_LOG_FATAL
        session_options.intra_op_num_threads = placement.intra_op_threads
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        _use_shared_cpu_arena(ort, session_options)
        try:
            self._session = ort.InferenceSession(
                str(bundle.weights), sess_options=session_options, providers=list(placement.providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"{bundle.weights}: onnxruntime could not load it: {exc}") from exc
        self._inputs = {spec.name: spec for spec in map(_spec, self._session.get_inputs())}
        self._outputs = {spec.name: spec for spec in map(_spec, self._session.get_outputs())}
        self._options = options
        self._working_set = WorkingSetModel(options.bytes_per_token, options.bytes_per_token_pair)
        self._run_plain = ort.RunOptions()
        self._run_shrink = ort.RunOptions()
        for run_options in (self._run_plain, self._run_shrink):
            run_options.log_severity_level = ORT_LOG_FATAL
        arenas = "cpu:0;gpu:0" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu:0"
        self._run_shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        self._pad_id = 0
        self._tokenizer = None
        capabilities = {Capability.TENSOR}
        embedding_dim = None
        if options.tokenizer:
            self._tokenizer, self._pad_id = self._load_tokenizer(bundle.file(options.tokenizer), options.max_length)
            self._hidden = options.hidden_state_output or next(iter(self._outputs))
            if self._hidden not in self._outputs:
                raise ModelLoadError(f"{bundle.name}: no output named {self._hidden!r}")
            if "input_ids" not in self._inputs:
                raise ModelLoadError(f"{bundle.name}: an embedding model needs an input_ids input")
            last = self._outputs[self._hidden].shape[-1:]
            embedding_dim = last[0] if last and last[0] > 0 else None
            capabilities.add(Capability.EMBEDDING)
        self.info = ModelInfo(
            capabilities=frozenset(capabilities),
            platform="onnxruntime_onnx",
            inputs=tuple(self._inputs.values()),
            outputs=tuple(self._outputs.values()),
            embedding_dim=embedding_dim,
            placement=(*placement.reasons, f"session providers: {', '.join(self._session.get_providers())}"),
        )

    @staticmethod
    def _load_tokenizer(path: Any, max_length: int) -> tuple[Any, int]:
        """The tokenizer, truncating and not padding (micro-batches pad), and its pad id."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a tokenizers JSON file: {exc}") from exc
        tokenizer.enable_truncation(max_length=max_length)
        pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
        tokenizer.no_padding()
        return tokenizer, pad_id

    def _run(self, names: list[str], feeds: dict[str, np.ndarray], estimate_bytes: int) -> list[np.ndarray]:
        shrink = estimate_bytes > SHRINK_ABOVE_BYTES
        return self._session.run(names, feeds, self._run_shrink if shrink else self._run_plain)

    # --- raw tensors ---------------------------------------------------------

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Refuse unknown names, missing inputs, wrong dtypes, wrong shapes and empty tensors
        (a zero-size dimension, which onnxruntime's kernels refuse in their own words)."""
        for name in inputs:
            if name not in self._inputs:
                raise InvalidInputError(
                    f"unknown input tensor '{name}'; this model takes: {', '.join(self._inputs)}",
                    param=name,
                )
        for name, spec in self._inputs.items():
            if name not in inputs:
                raise InvalidInputError(f"missing input tensor '{name}'", param=name)
            array = inputs[name]
            if array.dtype.name != spec.dtype and not (spec.dtype == "object" and array.dtype.kind in "OUS"):
                raise InvalidInputError(
                    f"input '{name}' must be {spec.dtype}, got {array.dtype.name}", param=name
                )
            if len(array.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
            ):
                raise InvalidInputError(
                    f"input '{name}' must have shape {list(spec.shape)} (-1: any), "
                    f"got {list(array.shape)}",
                    param=name,
                )
            if 0 in array.shape:
                raise InvalidInputError(
                    f"input '{name}' has shape {list(array.shape)}: every dimension must be at least 1",
                    param=name,
                )

    def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, ctx: JobContext
    ) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        names = list(outputs) if outputs else list(self._outputs)
        for name in names:
            if name not in self._outputs:
                raise InvalidInputError(
                    f"unknown output tensor '{name}'; this model gives: {', '.join(self._outputs)}",
                    param=name,
                )
        inputs = {name: _as_onnx(name, array) for name, array in inputs.items()}
        budget = ctx.limits.memory_budget_bytes
        rows, tokens, elements = self._row_shape(inputs)
        batchable = (rows > 0 and self.splits_along_batch(names)
                     and all(a.ndim and a.shape[0] == rows for a in inputs.values()))
        per_batch = rows_that_fit(self._working_set, budget, tokens, elements,
                                  what=f"one row of {elements} values") if batchable else rows
        if not batchable and rows * self._working_set.row_bytes(tokens, elements) > budget:
            raise WorkingSetTooLargeError(rows * self._working_set.row_bytes(tokens, elements) / MB,
                                          budget / MB, "this tensor (the model cannot be run in parts)")
        parts: list[list[np.ndarray]] = []
        for start in range(0, max(rows, 1), max(per_batch, 1)):
            if ctx.cancelled():
                raise WorkStopped("stopped between micro-batches")
            feeds = {k: v[start:start + per_batch] for k, v in inputs.items()} if batchable else inputs
            size = len(next(iter(feeds.values()))) if batchable else rows
            try:
                outs = self._run(names, feeds, size * self._working_set.row_bytes(tokens, elements))
            except Exception as exc:  # values the declared shapes allow but the graph refuses
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
                log.info("onnxruntime refused inputs of shapes %s: %s", shapes, _first_line(exc))
                raise InvalidInputError(f"the model cannot run on inputs of these shapes: {shapes} "
                                        "(check that they agree with each other)") from exc
            if not parts and batchable and size < rows:  # the whole answer must fit too
                projected = sum(r.nbytes for r in outs) * rows / max(size, 1)
                if projected > budget:
                    raise WorkingSetTooLargeError(projected / MB, budget / MB, "the outputs")
            parts.append(outs)
            if not batchable:
                break
        if len(parts) == 1:
            results = dict(zip(names, parts[0], strict=True))
        else:
            results = {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}
            del parts
        if rows * self._working_set.row_bytes(tokens, elements) > SHRINK_ABOVE_BYTES:
            _give_back_heap()
        return results

    def _row_shape(self, inputs: dict[str, np.ndarray]) -> tuple[int, int, int]:
        """(rows along the first dimension, free-length positions per row, values per row)
        of the largest input: what the working-set estimate is made from."""
        rows, tokens, elements = 0, 1, 1
        for name, array in inputs.items():
            if not array.ndim:
                continue
            spec = self._inputs[name]
            per_row = int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else 1
            free = int(np.prod([d for d, want in zip(array.shape[1:], spec.shape[1:], strict=False)
                                if want == -1], dtype=np.int64))
            rows = max(rows, array.shape[0])
            if per_row >= elements:
                tokens, elements = max(1, free), max(1, per_row)
        return rows, tokens, elements

    def splits_along_batch(self, outputs: list[str]) -> bool:
        """Whether the model can be run on slices of rows: every input and every wanted
        output has a free first dimension."""
        return all(s.shape[:1] == (-1,) for s in self._inputs.values()) and all(
            n in self._outputs and self._outputs[n].shape[:1] == (-1,) for n in outputs)

    # --- embeddings ----------------------------------------------------------

    def embed(self, texts: list[str], normalize: bool | None, ctx: JobContext) -> EmbeddingResult:
        if self._tokenizer is None:
            return super().embed(texts, normalize, ctx)
        encodings = self._tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        budget = ctx.limits.memory_budget_bytes
        vectors: np.ndarray | None = None
        for batch in length_sorted_batches(lengths, self._working_set, budget):
            if ctx.cancelled():
                raise WorkStopped("stopped between micro-batches")
            pooled = self._embed_batch([encodings[i] for i in batch], normalize)
            if vectors is None:
                vectors = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            vectors[batch] = pooled
        assert vectors is not None  # texts is never empty
        if sum(lengths) * self._working_set.bytes_per_token > SHRINK_ABOVE_BYTES:
            _give_back_heap()
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(lengths), input_tokens=tuple(lengths))

    def _embed_batch(self, encodings: list[Any], normalize: bool | None) -> np.ndarray:
        """Pooled vectors of one micro-batch, padded to its own longest input."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
            types[row, :len(e.ids)] = e.type_ids
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = mask
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = types
        try:
            (hidden,) = self._run([self._hidden], feeds, len(encodings) * self._working_set.row_bytes(width))
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {_first_line(exc)}") from exc
        if self._options.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = mask[:, :, None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self._options.normalize if normalize is None else normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32)


def _give_back_heap() -> None:
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def _as_onnx(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime's string tensors take Python str: it would store str(b"...") for a bytes
    element, and cut numpy fixed-width bytes at the first NUL. Decode BYTES elements here."""
    if array.dtype.kind not in "OS":
        return array
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        if isinstance(item, (bytes, np.bytes_)):
            try:
                flat[i] = bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError(
                    f"input '{name}': element {i} is not UTF-8 text, which this model's string input needs",
                    param=name,
                ) from None
        else:
            flat[i] = str(item)
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
