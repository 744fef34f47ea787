"""ONNX models on onnxruntime: raw tensors for anything, sentence embeddings when a
tokenizer comes with the bundle.

Input checking happens here, against the model's own declared names, dtypes and
shapes, so a wrong request is a precise `InvalidInputError` rather than an
onnxruntime stack trace. Embeddings follow sentence-transformers: tokenize with
the bundle's tokenizer.json, run, mean-pool over the attention mask (or take the
CLS token), optionally L2-normalise.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .backend import (
    BackendBase,
    Capability,
    EmbeddingResult,
    JobContext,
    ModelInfo,
    TensorSpec,
)
from .bundle import ModelBundle
from .devices import MachineSettings, choose_onnx_placement, onnx_available_providers
from .errors import InferenceError, InvalidInputError, ModelLoadError

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
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = placement.intra_op_threads
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(bundle.weights), sess_options=session_options, providers=list(placement.providers)
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"{bundle.weights}: onnxruntime could not load it: {exc}") from exc
        self._inputs = {spec.name: spec for spec in map(_spec, self._session.get_inputs())}
        self._outputs = {spec.name: spec for spec in map(_spec, self._session.get_outputs())}
        self._options = options
        self._tokenizer = None
        capabilities = {Capability.TENSOR}
        embedding_dim = None
        if options.tokenizer:
            self._tokenizer = self._load_tokenizer(bundle.file(options.tokenizer), options.max_length)
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
    def _load_tokenizer(path: Any, max_length: int) -> Any:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a tokenizers JSON file: {exc}") from exc
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding()
        return tokenizer

    # --- raw tensors ---------------------------------------------------------

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Refuse unknown names, missing inputs, wrong dtypes and wrong shapes."""
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
        try:
            results = self._session.run(names, {name: _as_onnx(name, array) for name, array in inputs.items()})
        except Exception as exc:  # values the declared shapes allow but the graph refuses
            raise InvalidInputError(f"onnxruntime refused the inputs: {_first_line(exc)}") from exc
        return dict(zip(names, results, strict=True))

    # --- embeddings ----------------------------------------------------------

    def embed(self, texts: list[str], normalize: bool | None, ctx: JobContext) -> EmbeddingResult:
        if self._tokenizer is None:
            return super().embed(texts, normalize, ctx)
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = mask
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        try:
            (hidden,) = self._session.run([self._hidden], feeds)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {_first_line(exc)}") from exc
        if self._options.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = mask[:, :, None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self._options.normalize if normalize is None else normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return EmbeddingResult(vectors=pooled.astype(np.float32), prompt_tokens=int(mask.sum()))


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
