"""The model store: content-addressed blobs, versions, the atomic `current` switch, and
what a crash can leave behind."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import EMBED

from agent.cli.demo import DEMO_MODELS, DEMO_REASON, build_bundle, build_demo_bundles
from runtime.errors import StoreError
from runtime.store import ModelStore

TOML = 'format = "onnx"\nfile = "model.onnx"\ntask = "tensor"\nversion = "{v}"\n'


def add_version(store: ModelStore, name: str, version: str, payload: bytes) -> dict[str, str]:
    files = {"model.toml": store.add_bytes(TOML.format(v=version).encode()), "model.onnx": store.add_bytes(payload)}
    store.lay_out(name, version, files)
    return files


def test_versions_switch_atomically_and_keep_the_previous_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ensure_layout()
    v1 = add_version(store, "m", "1", b"one")
    add_version(store, "m", "2", b"two")
    assert store.activate("m", "1") is None
    assert store.activate("m", "2") == "1"
    assert os.readlink(tmp_path / "models/m/current") == "2"
    assert (tmp_path / "models/m/current/model.onnx").read_bytes() == b"two"
    # files are the blobs themselves, by hash
    assert os.path.samefile(tmp_path / "models/m/1/model.onnx", tmp_path / "store" / v1["model.onnx"])
    state = json.loads((tmp_path / "state.json").read_text())["models"]["m"]
    assert (state["current"], state["previous"], state["confirmed"]) == ("2", "1", "1")
    assert [h["event"] for h in state["history"]] == ["activated", "activated"]
    assert store.roll_back("m", reason="health check failed") == "1"
    assert os.readlink(tmp_path / "models/m/current") == "1"
    record = store.record("m")
    assert (record.current, record.previous, record.confirmed) == ("1", "2", "1")
    assert record.history[-1].reason == "health check failed"
    assert store.verify_version("m", "2")


def test_a_tampered_version_file_fails_verification(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    add_version(store, "m", "1", b"weights")
    path = tmp_path / "models/m/1/model.onnx"
    os.chmod(path, 0o644)
    path.write_bytes(b"weightz")
    assert not store.verify_version("m", "1")


@pytest.mark.parametrize(
    "name,version,file",
    [
        ("../x", "1", "f"),
        ("m", "..", "f"),
        ("m", "1", "../f"),
        ("m", "1", "a/b"),
        ("m", "current", "f"),
        ("m", "1", ".hidden"),
    ],
)
def test_names_that_could_escape_the_layout_are_refused(tmp_path: Path, name: str, version: str, file: str) -> None:
    store = ModelStore(tmp_path)
    sha = store.add_bytes(b"x")
    with pytest.raises(StoreError):
        store.lay_out(name, version, {"model.toml": sha, file: sha})
    models = tmp_path / "models"
    assert not models.exists() or not any(models.rglob("*")), "something was laid out"


def test_a_version_needs_its_blobs_in_the_store_first(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    sha = store.add_bytes(b"toml")
    with pytest.raises(StoreError, match="blobs missing"):
        store.lay_out("m", "1", {"model.toml": sha, "model.onnx": "0" * 64})


def test_recovery_after_a_crash_mid_switch_serves_the_confirmed_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    add_version(store, "m", "1", b"one")
    store.activate("m", "1")
    add_version(store, "m", "2", b"two")
    store.activate("m", "2")
    # a crash left: a half-built version dir, a temp link, a temp blob, and `current`
    # naming a version whose directory is gone
    (tmp_path / "models/m/.staging-abc").mkdir()
    (tmp_path / "models/m/.current-99.tmp").symlink_to("2")
    (tmp_path / "store/.tmp-deadbeef-1").write_bytes(b"partial")
    (tmp_path / "staging").mkdir(exist_ok=True)
    (tmp_path / "staging" / ("a" * 64 + ".part")).write_bytes(b"resumable")
    shutil.rmtree(tmp_path / "models/m/2")
    repaired = store.recover()
    assert os.readlink(tmp_path / "models/m/current") == "1"
    assert any("back to 1" in line for line in repaired)
    assert sorted(p.name for p in (tmp_path / "models/m").iterdir()) == ["1", "current"]
    assert not list((tmp_path / "store").glob(".tmp-*"))
    assert (tmp_path / "staging" / ("a" * 64 + ".part")).read_bytes() == b"resumable"  # downloads resume
    assert store.bundle("m").version == "1"


def test_prune_keeps_current_previous_and_confirmed_and_collects_blobs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    shas = {}
    for v in ("1", "2", "3", "4"):
        shas[v] = add_version(store, "m", v, f"weights {v}".encode())
        store.activate("m", v)
        store.confirm("m", v)
    removed = store.prune("m", keep=2)
    assert removed == ["1", "2"]
    assert store.versions("m") == ["3", "4"]
    assert not store.has_blob(shas["1"]["model.onnx"])
    assert store.has_blob(shas["3"]["model.onnx"])


def test_demo_build_uses_the_store_and_never_moves_current_back(tmp_path: Path) -> None:
    build_demo_bundles(tmp_path / "models")
    store = ModelStore(tmp_path)
    demo_version = store.current(EMBED)
    files = store.record(EMBED).versions[demo_version]
    assert all(store.has_blob(sha) for sha in files.values())
    newer = dict(
        files,
        **{
            "model.toml": store.add_bytes(
                (tmp_path / "models" / EMBED / "current" / "model.toml")
                .read_bytes()
                .replace(f'version = "{demo_version}"'.encode(), b'version = "2"')
            )
        },
    )
    store.lay_out(EMBED, "2", newer)
    store.activate(EMBED, "2")
    build_demo_bundles(tmp_path / "models")  # `serve --demo` again, after an update
    assert store.current(EMBED) == "2"
    assert store.bundle(EMBED).version == "2"


def lay_out_copy(store: ModelStore, name: str, version: str) -> None:
    """Another version of `name`: the current one's files under a new version string."""
    current = store.current(name)
    files = store.record(name).versions[current]
    toml = (store.models / name / "current" / "model.toml").read_bytes()
    store.lay_out(name, version, dict(
        files, **{"model.toml": store.add_bytes(toml.replace(f'version = "{current}"'.encode(),
                                                             f'version = "{version}"'.encode()))}))


def test_an_upgraded_agent_serves_its_own_demo_version_in_place_of_an_older_demo(tmp_path: Path) -> None:
    build_demo_bundles(tmp_path / "models")
    store = ModelStore(tmp_path)
    demo_version = store.current(EMBED)
    lay_out_copy(store, EMBED, "0.9")
    store.activate(EMBED, "0.9", reason=DEMO_REASON)  # what an older release's demo did
    build_demo_bundles(tmp_path / "models")  # `serve --demo` after the upgrade
    assert store.current(EMBED) == demo_version
    assert store.record(EMBED).previous == "0.9"


def test_a_demo_version_from_before_the_store_kept_history_is_replaced_too(tmp_path: Path) -> None:
    build_demo_bundles(tmp_path / "models")
    store = ModelStore(tmp_path)
    embed = next(demo for demo in DEMO_MODELS if demo.name == EMBED)
    demo_version = store.current(EMBED)
    lay_out_copy(store, EMBED, "0.8")
    store._switch_link(EMBED, "0.8")  # an old release's layout: the link, no history entry
    build_bundle(store, replace(embed, earlier=("0.8",)))
    assert store.current(EMBED) == demo_version
    # an unknown version with no history is somebody else's: left serving
    lay_out_copy(store, EMBED, "0.7")
    store._switch_link(EMBED, "0.7")
    build_bundle(store, replace(embed, earlier=("0.8",)))
    assert store.current(EMBED) == "0.7"


def test_a_serving_demo_version_an_older_release_laid_out_otherwise_is_kept_not_a_crash(tmp_path: Path) -> None:
    build_demo_bundles(tmp_path / "models")
    store = ModelStore(tmp_path)
    version = store.current(EMBED)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["models"][EMBED]  # laid out before the store recorded versions
    (tmp_path / "state.json").write_text(json.dumps(state))
    toml = tmp_path / "models" / EMBED / version / "model.toml"
    old_text = toml.read_text() + "# an older release wrote other keys\n"
    toml.unlink()  # a hard link to the blob: replace, do not edit in place
    toml.write_text(old_text)
    bundles = {b.name: b for b in build_demo_bundles(tmp_path / "models")}  # `serve --demo` after the upgrade
    assert bundles[EMBED].version == version
    assert toml.read_text() == old_text


def test_models_rollback_with_no_agent_running_switches_current_on_disk(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import free_port

    store = ModelStore(tmp_path / "state")
    add_version(store, "m", "1", b"one")
    store.activate("m", "1")
    add_version(store, "m", "2", b"two")
    store.activate("m", "2")
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[server]\nport = {free_port()}\n')
    done = subprocess.run([sys.executable, "-m", "agent", "models", "rollback", "m", "--config", str(config)],
                          check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert "current is now 1" in done.stdout
    assert store.current("m") == "1"
    journal = json.loads((tmp_path / "state/sync/journal.json").read_text())
    assert [(d["model"], d["version"], d["code"]) for d in journal["deny"]] == [("m", "2", "operator")]
    again = subprocess.run([sys.executable, "-m", "agent", "models", "rollback", "nope", "--config", str(config)],
                           check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert again.returncode == 1 and again.stderr.startswith("edgefleet: cannot roll nope back")
    assert "Traceback" not in again.stderr
