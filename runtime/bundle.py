"""A model bundle: one version of one model as a directory with a ``model.toml``.

The bundle is the unit the registry loads and (later) the hub ships: its files
plus the runtime options that belong to the model rather than to the machine.
Parsing is strict so that a bad bundle is refused before any native code runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.errors import BundleError
from runtime.structured import SchemaError, from_mapping

MODEL_TOML = "model.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

Format = Literal["gguf", "onnx"]
#: [gguf] keys that only a task "embedding" bundle uses
EMBEDDING_ONLY = ("pooling", "normalize")
Task = Literal["chat", "completion", "embedding", "tensor"]


@dataclass(frozen=True)
class GgufOptions:
    """llama.cpp options that belong to the model (the machine decides threads and offload)."""

    n_ctx: int = 2048
    n_batch: int = 512
    #: "auto" offloads every layer when llama.cpp reports a GPU; an integer forces a count.
    n_gpu_layers: int | Literal["auto"] = "auto"
    #: Jinja chat template overriding the one stored in the GGUF metadata.
    chat_template: str | None = None
    #: llama.cpp's flash attention; on by default, as llama-server's "auto" turns it on
    #: wherever the backend has it (the CPU does): decode with several sequences is ~20% faster.
    flash_attn: bool = True
    #: Prompts are evaluated in pieces of this many tokens aligned to position 0, and the
    #: prefix cache reuses whole pieces (docs/architecture.md, "Repeatable greedy output").
    #: "auto": 64 on the CPU (where prompt speed hardly depends on it), n_batch on a GPU.
    prompt_chunk: int | Literal["auto"] = "auto"
    #: Type of the KV cache's keys and values. "auto": q8_0 with flash attention, else f16
    #: (llama.cpp quantizes the V cache only with flash attention). Why q8_0: with an f16
    #: cache llama.cpp's CPU attention takes other code paths by shape (64 or more prompt
    #: rows; one sequence alone past 256 cells of context), so a greedy answer could differ
    #: alone and beside others; with q8_0 every shape takes one path, and on the 2-core VM
    #: decode is faster too (docs/architecture.md, "Repeatable greedy output").
    kv_cache_type: Literal["auto", "f16", "q8_0"] = "auto"
    #: task "embedding" only (runtime/gguf/gguf_embedding.py): how token vectors become one vector;
    #: "auto": what the GGUF metadata says (<arch>.pooling_type), else mean.
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    #: task "embedding" only: L2-normalize the vectors (a request's `normalize` overrides it).
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be at least 16")
        if self.n_batch < 1:
            raise ValueError("n_batch must be at least 1")
        if self.prompt_chunk != "auto" and not 1 <= self.prompt_chunk <= self.n_batch:
            raise ValueError(f"prompt_chunk must be 1..n_batch ({self.n_batch}) or \"auto\"")
        if self.kv_cache_type == "q8_0" and not self.flash_attn:
            raise ValueError("kv_cache_type q8_0 needs flash_attn = true (llama.cpp quantizes the V cache "
                             "only with flash attention)")

    @property
    def kv_type(self) -> Literal["f16", "q8_0"]:
        """The KV cache type `kv_cache_type` resolves to."""
        if self.kv_cache_type == "auto":
            return "q8_0" if self.flash_attn else "f16"
        return self.kv_cache_type


@dataclass(frozen=True)
class OnnxOptions:
    """onnxruntime options, and how to turn text into embeddings when there is a tokenizer."""

    #: tokenizer.json (Hugging Face `tokenizers` format) that makes this an embedding model.
    tokenizer: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int = 256
    #: Output holding per-token hidden states; default: the model's first output.
    hidden_state_output: str | None = None
    #: Execution providers to prefer over the automatic choice, e.g. ["CUDAExecutionProvider"].
    providers: list[str] = field(default_factory=list)
    #: Working-set estimate per row of a run (runtime/scheduling/working_set.py): bytes per token
    #: (per value of the row) and per token pair (attention). Defaults measured on
    #: all-MiniLM-L6-v2 int8, with a margin.
    bytes_per_token: int = 8192
    bytes_per_token_pair: int = 320

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError("max_length must be at least 1")
        if self.bytes_per_token < 0 or self.bytes_per_token_pair < 0:
            raise ValueError("bytes_per_token and bytes_per_token_pair must be 0 or more")


@dataclass(frozen=True)
class ProbeOptions:
    """The model's own smoke test: what a new version must answer before it serves
    (runtime/probe.py). Text models get `text`; tensor models get zeros of their declared shapes."""

    text: str = "Say OK."
    max_tokens: int = 1

    def __post_init__(self) -> None:
        if not self.text or self.max_tokens < 1:
            raise ValueError("probe.text must not be empty and probe.max_tokens must be at least 1")


@dataclass(frozen=True)
class BundleManifest:
    """The contents of model.toml."""

    format: Format
    file: str
    task: Task
    version: str = "1"
    description: str = ""
    gguf: GgufOptions = field(default_factory=GgufOptions)
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    probe: ProbeOptions = field(default_factory=ProbeOptions)


@dataclass(frozen=True)
class ModelBundle:
    """A parsed bundle: where it is, what it is called and what model.toml says."""

    name: str
    path: Path
    manifest: BundleManifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def weights(self) -> Path:
        return self.path / self.manifest.file

    def file(self, relative: str) -> Path:
        """A file of this bundle, refusing names that escape the bundle directory."""
        candidate = (self.path / relative).resolve()
        if not candidate.is_relative_to(self.path.resolve()):
            raise BundleError(f"{self.path / MODEL_TOML}: file {relative!r} is outside the bundle")
        return candidate

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def check_model_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BundleError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)"
        )
    return name


def read_bundle(path: Path, name: str | None = None) -> ModelBundle:
    """Parse and check a bundle directory; `name` defaults to the directory's model name."""
    path = Path(path)
    toml_path = path / MODEL_TOML
    if not toml_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MODEL_TOML})")
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{toml_path}: {exc}") from None
    try:
        manifest = from_mapping(BundleManifest, data)
    except SchemaError as exc:
        raise BundleError(f"{toml_path}: {exc}") from None
    if manifest.format == "gguf" and manifest.task not in ("chat", "completion", "embedding"):
        raise BundleError(f"{toml_path}: a gguf bundle serves task 'chat', 'completion' or 'embedding'")
    if manifest.format == "onnx" and manifest.task == "embedding" and not manifest.onnx.tokenizer:
        raise BundleError(f"{toml_path}: task 'embedding' needs onnx.tokenizer")
    bundle = ModelBundle(
        name=check_model_name(name or _default_name(path)), path=path, manifest=manifest
    )
    for relative in [manifest.file, manifest.onnx.tokenizer]:
        if relative and not bundle.file(relative).is_file():
            raise BundleError(f"{toml_path}: file {relative!r} is missing from the bundle")
    return bundle


def _default_name(path: Path) -> str:
    # models/<name>/<version>/ or models/<name>/current -> <name>; a bare dir -> its own name
    resolved = path.resolve()
    if path.name == "current" or resolved.parent.parent.name == "models":
        return resolved.parent.name
    return resolved.name


def write_manifest(path: Path, manifest: BundleManifest) -> None:
    """Write model.toml for a bundle we build ourselves (demo bundles, tests)."""
    lines = [
        f'format = "{manifest.format}"',
        f'file = "{manifest.file}"',
        f'task = "{manifest.task}"',
        f'version = "{manifest.version}"',
        f"description = {_toml_str(manifest.description)}",
    ]
    for section in ("gguf", "onnx"):
        if manifest.format != section:
            continue
        lines.append(f"\n[{section}]")
        for key, value in dataclasses.asdict(getattr(manifest, section)).items():
            if value is None or (section == "gguf" and key in EMBEDDING_ONLY and manifest.task != "embedding"):
                continue  # (embedding keys left out elsewhere: demo bundles keep their bytes)
            lines.append(f"{key} = {_toml_value(value)}")
    if manifest.probe != ProbeOptions():
        lines.append("\n[probe]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(manifest.probe).items()]
    (path / MODEL_TOML).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _toml_str(value: str) -> str:
    # JSON's string escapes are TOML's basic-string escapes (a chat_template has newlines)
    return json.dumps(value, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(str(value))
