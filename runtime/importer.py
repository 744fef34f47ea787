"""Models without a hub: turn a ``.gguf``, an ``.onnx`` or a bundle directory into a version.

`inspect_model` checks that a path is a model before anything is stored: a GGUF must
start with the GGUF magic and llama.cpp must read its metadata; an ONNX file must
parse in onnxruntime; a directory must be a valid bundle (runtime/bundle.py). It
writes the model.toml a bare file lacks, with defaults read from the file itself
(task from the GGUF metadata: a pooling type means embeddings, a chat template
means chat; context length from ``<arch>.context_length``, capped). The chat
template stays in the GGUF, where the backend reads it.

`commit_import` puts the files in the store through its own API (blobs, `lay_out`,
`activate`) and records the name as imported (``<state_dir>/imported.json``), which is
what makes an agent serve a name its config does not list. A version is immutable:
the same name and version with other bytes is refused (`ImportConflict`), the same
bytes are a no-op. The default version is derived from the bytes (``sha-<12 hex>``),
so importing one file twice is a no-op and another file is another version.

Who runs this: the CLI when no agent runs (it holds the state-dir lock), else the
running agent, to which the CLI uploads the files (agent/http/models_api.py); either
way the same two functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from runtime.bundle import MODEL_TOML, BundleManifest, GgufOptions, check_model_name, read_bundle, write_manifest
from runtime.errors import BundleError, ModelLoadError, StoreError
from runtime.files import sha256_file, write_file_atomic
from runtime.store import FILE_NAME_RE, ModelStore, check_version

GGUF_MAGIC = b"GGUF"
#: imported GGUFs get at most this context by default (model.toml's gguf.n_ctx can say more)
DEFAULT_MAX_CTX = 4096
IMPORTED_FILE = "imported.json"
#: the reason the store records when an import activates a version
IMPORT_REASON = "imported"
#: GGUF architectures that are text encoders (embeddings) even without a pooling type
ENCODER_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "neo-bert", "modern-bert"})


class NotAModelError(BundleError):
    """The path is not a model this agent can serve (not GGUF, not ONNX, not a bundle)."""


class ImportConflict(StoreError):
    """The name and version exist with other bytes: a version is immutable."""


@dataclass(frozen=True)
class ImportPlan:
    """What an import will store: bundle file name -> its bytes on disk, and the model.toml."""

    name: str
    version: str
    manifest: BundleManifest
    #: bundle file name -> the file that has its bytes (model.toml included)
    sources: Mapping[str, Path]


def default_name(path: Path) -> str:
    """A model name from a file or directory name: letters, digits, '.', '_', '-'."""
    stem = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower()[:128]
    return name or "model"


def _short_sha(path: Path) -> str:
    return "sha-" + sha256_file(path)[:12]


def inspect_model(path: Path, name: str | None, version: str | None, workdir: Path) -> ImportPlan:
    """Check that `path` is a model and plan its version; a model.toml written for a bare
    file goes in `workdir`. Raises `NotAModelError` (or `BundleError`) with one sentence."""
    path = Path(path)
    if not path.exists():
        raise NotAModelError(f"{path}: no such file or directory")
    name = check_model_name(name or default_name(path))
    if version is not None:
        check_version(version)
    if path.is_dir():
        return _inspect_bundle(path, name, version)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if path.suffix.lower() == ".gguf" or head == GGUF_MAGIC:
        if head != GGUF_MAGIC:
            raise NotAModelError(f"{path}: not a GGUF model (the file does not start with the GGUF magic)")
        manifest = _gguf_manifest(path)
        file_name = "model.gguf"
    elif path.suffix.lower() == ".onnx":
        manifest = _onnx_manifest(path)
        file_name = "model.onnx"
    else:
        raise NotAModelError(f"{path}: not a model: give a .gguf file, an .onnx file or a bundle directory "
                             "(with a model.toml)")
    manifest = replace(manifest, file=file_name, version=version or _short_sha(path))
    write_manifest(workdir, manifest)
    return ImportPlan(name, manifest.version, manifest, {file_name: path, MODEL_TOML: workdir / MODEL_TOML})


def _inspect_bundle(path: Path, name: str, version: str | None) -> ImportPlan:
    bundle = read_bundle(path, name=name)
    if version is not None and version != bundle.version:
        raise BundleError(f"{path / MODEL_TOML} says version {bundle.version!r}, not {version!r}: a bundle's "
                          "version is its model.toml's (leave --version out, or change model.toml)")
    sources: dict[str, Path] = {}
    for item in sorted(path.iterdir()):
        if item.name.startswith("."):
            continue
        if not item.is_file() or not FILE_NAME_RE.match(item.name):
            raise BundleError(f"{item}: a bundle holds plain files with simple names, no subdirectories")
        sources[item.name] = item
    weights = bundle.weights
    if bundle.manifest.format == "gguf":
        with open(weights, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise NotAModelError(f"{weights}: not a GGUF model (the file does not start with the GGUF magic)")
        _gguf_metadata(weights)
    else:
        _onnx_manifest(weights)
    return ImportPlan(name, bundle.version, bundle.manifest, sources)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """llama.cpp prints to fd 2 even with verbose=False; a CLI's error must stay one line.
    (Process-wide: used by the CLI, never in the agent's threads.)"""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _gguf_metadata(path: Path) -> dict[str, str]:
    from runtime.gguf.gguf_embedding import read_gguf_metadata

    try:
        with _native_stderr_silenced():
            return read_gguf_metadata(str(path))
    except ModelLoadError as exc:
        raise NotAModelError(f"{path}: not a GGUF model llama.cpp can read ({exc})") from None


def _gguf_manifest(path: Path) -> BundleManifest:
    from runtime.gguf.gguf_embedding import metadata_pooling

    metadata = _gguf_metadata(path)
    arch = metadata.get("general.architecture", "")
    try:
        trained_ctx = int(metadata.get(f"{arch}.context_length", "0"))
    except ValueError:
        trained_ctx = 0
    n_ctx = min(trained_ctx, DEFAULT_MAX_CTX) if trained_ctx >= 16 else 2048
    if metadata_pooling(metadata) not in (None, "none") or arch in ENCODER_ARCHS:
        task = "embedding"
        how = "embeddings (pooling from its metadata)"
    elif metadata.get("tokenizer.chat_template"):
        task, how = "chat", "chat (template from its metadata)"
    else:
        task, how = "completion", "completion (no chat template in its metadata)"
    label = metadata.get("general.name") or path.name
    return BundleManifest(format="gguf", file="model.gguf", task=task,  # type: ignore[arg-type]
                          description=f"{label} ({arch}), imported from {path.name}: {how}",
                          gguf=GgufOptions(n_ctx=n_ctx, n_batch=min(512, n_ctx)))


def _onnx_manifest(path: Path) -> BundleManifest:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for every kind of bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotAModelError(f"{path}: not an ONNX model onnxruntime can load ({first[:300]})") from None
    inputs = ", ".join(i.name for i in session.get_inputs())
    return BundleManifest(format="onnx", file="model.onnx", task="tensor",
                          description=f"imported from {path.name} (inputs: {inputs})")


def file_digests(plan: ImportPlan) -> dict[str, str]:
    """Bundle file name -> sha256 of its bytes (blocking: reads every file)."""
    return {file_name: sha256_file(source) for file_name, source in plan.sources.items()}


def check_immutable(store: ModelStore, name: str, version: str, files: Mapping[str, str]) -> bool:
    """True when `name` `version` already holds exactly `files` (a no-op import); raises
    `ImportConflict` when it holds other bytes; False when it is new."""
    if not store.has_version(name, version):
        return False
    existing = store.record(name).versions.get(version)
    if existing == dict(files):
        return True
    raise ImportConflict(f"{name} {version} exists with other bytes; a version is immutable: import it under "
                         "another --version (or leave --version out: the default is derived from the bytes)")


def commit_import(store: ModelStore, name: str, version: str, files: Mapping[str, str]) -> bool:
    """Lay out `files` (name -> sha256 of a blob in the store) as `name` `version`, make it
    current and mark the name imported. Returns False when nothing changed on disk."""
    same = check_immutable(store, name, version, files)
    if not same:
        store.lay_out(name, version, files)
    changed = not same or store.current(name) != version
    if store.current(name) != version:
        store.activate(name, version, reason=IMPORT_REASON)
    mark_imported(store.root, name, True)
    return changed


def import_files(store: ModelStore, plan: ImportPlan) -> bool:
    """`commit_import` of a plan whose files are on this machine (the offline CLI)."""
    digests = file_digests(plan)
    check_immutable(store, plan.name, plan.version, digests)  # before anything is copied
    for file_name, source in plan.sources.items():
        store.add_file(source, expected_sha256=digests[file_name])
    return commit_import(store, plan.name, plan.version, digests)


def imported_names(state_dir: Path | str) -> list[str]:
    """Names imported without a hub (`models import` / `models pull`), which an agent serves
    beside the ones its config lists."""
    try:
        data = json.loads((Path(state_dir) / IMPORTED_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StoreError(f"{Path(state_dir) / IMPORTED_FILE}: unreadable ({exc})") from None
    return sorted(n for n in data.get("models", []) if isinstance(n, str))


def mark_imported(state_dir: Path | str, name: str, imported: bool) -> None:
    names = set(imported_names(state_dir))
    if (name in names) == imported:
        return
    names = names | {name} if imported else names - {name}
    body = json.dumps({"models": sorted(names)}, indent=1).encode()
    write_file_atomic(Path(state_dir) / IMPORTED_FILE, body)


def remove_model(store: ModelStore, name: str, version: str | None) -> list[str]:
    """Delete one version of `name` (or every version) from disk; blobs no version uses go
    too. The caller has made sure nothing serves it. Returns the versions removed."""
    removed = store.remove(name, version)
    if version is None or not store.versions(name):
        mark_imported(store.root, name, False)
    return removed
