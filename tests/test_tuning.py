"""Settings measured on the machine itself (issue 29, part 1 and its faults).

Real model, real processes: `edgefleet tune` measures the demo chat model's candidates,
each in its own child process, and caches the choice; an agent started on that cache
applies it without measuring again, measures again when the model file changes, and
keeps what the bundle and the config set. A candidate whose child aborts (the test's
stand-in for a kernel path that crashes) is marked unsafe while the rest go on; SIGTERM
in the middle of a run leaves the previous cache as it was.

To keep the suite fast only the attention knob (three candidates) is searched, with two
slots of 256 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import CHAT, free_port, start_agent

from agent.cli.demo import build_demo_bundles
from agent.config import load_config
from sync.telemetry.payload import model_fields

REPO = Path(__file__).resolve().parents[1]
CRASH = "attention=f16"
QUICK = ["--prompt-tokens", "32", "--decode-tokens", "8"]


def write_config(path: Path, state: Path, mode: str, model_path: str | None = None,
                 budget_s: float = 600, knobs: str = "attention", threads: int = 1) -> Path:
    """A config with two small slots and one knob searched; threads pinned (to 1: a measuring
    child with 2 threads on a machine that other work keeps busy is ten times slower)."""
    where = f'\npath = "{model_path}"' if model_path else ""
    path.write_text(f'state_dir = "{state}"\n[server]\nport = {free_port()}\n[runtime]\nthreads = {threads}\n'
                    f'[batching]\ngguf_slots = 2\ngguf_ctx_per_slot = 256\n'
                    f'[tuning]\nmode = "{mode}"\nbudget_s = {budget_s}\nknobs = ["{knobs}"]\n'
                    f'candidate_timeout_s = 600\n'
                    f'[[models]]\nname = "{CHAT}"{where}\n')
    return path


def edgefleet(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "EDGEFLEET_CONFIG": "", **(env or {})}, check=False)


@dataclass
class Tuned:
    state: Path
    config: Path
    run: subprocess.CompletedProcess[str]

    @property
    def cache(self) -> Path:
        return self.state / "tuning" / f"{CHAT}.json"

    def record(self) -> dict:
        return json.loads(self.cache.read_text())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    """`edgefleet tune` on the demo chat model, with the f16 candidate's child made to abort."""
    state = tmp_path_factory.mktemp("tuning-state")
    build_demo_bundles(state / "models")
    config = write_config(state / "agent.toml", state, "before_ready")
    run = edgefleet("tune", CHAT, "--config", str(config), *QUICK, env={"EDGEFLEET_TUNING_CRASH": CRASH})
    return Tuned(state, config, run)


def agent_config(path: Path) -> object:
    return load_config(path, environ={})


def metric_line(text: str, name: str, model: str) -> str | None:
    return next((line for line in text.splitlines() if line.startswith(name + "{") and f'model="{model}"' in line),
                None)


def test_tune_prints_the_candidates_and_caches_the_choice(tuned: Tuned) -> None:
    assert tuned.run.returncode == 0, tuned.run.stderr
    out = tuned.run.stdout
    assert "candidate" in out and "decode@2 tok/s" in out, out
    for label in ("default", "attention=f16", "attention=f16+fa"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), out
    record = tuned.record()
    assert record["choice"] is not None and f"choice: {record['choice_label']}: KV cache" in out
    if record["choice_label"] != "default":  # a choice other than the defaults led them again, side by side
        assert record["rematch"]["held"] and record["rematch"]["score"] > 1.05, record["rematch"]
        assert "rematch beside the defaults" in out and "kept" in out
    assert len(record["fingerprint"]) == 64 and record["model"]["sha256"] and record["machine"]["llama_system_info"]
    default = next(c for c in record["candidates"] if c["label"] == "default")
    assert default["status"] == "ok" and default["figures"]["decode_slots_tps"] > 0, default


def test_a_crashing_candidate_is_marked_unsafe_and_the_others_go_on(tuned: Tuned) -> None:
    record = tuned.record()
    by_label = {c["label"]: c for c in record["candidates"]}
    assert by_label[CRASH]["status"] == "unsafe", by_label[CRASH]
    assert "SIGABRT" in by_label[CRASH]["reason"]
    assert by_label["attention=f16+fa"]["status"] in ("ok", "rejected")  # measured after the crash
    assert record["choice_label"] != CRASH
    row = next(line for line in tuned.run.stdout.splitlines() if line.startswith(CRASH + " "))
    assert "unsafe" in row and "killed by SIGABRT" in row, row
    assert "Traceback" not in tuned.run.stderr


def test_an_unknown_model_is_one_line_and_a_non_zero_exit(tuned: Tuned) -> None:
    run = edgefleet("tune", "no-such-model", "--config", str(tuned.config), timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("edgefleet: no model named 'no-such-model'"), run.stderr
    assert "Traceback" not in run.stderr
    bad = edgefleet("tune", CHAT, "--config", str(tuned.config), "--knobs", "warp", timeout=60)
    assert bad.returncode == 2 and "unknown knob 'warp'" in bad.stderr


def test_sigterm_in_the_middle_leaves_the_previous_cache(tuned: Tuned) -> None:
    before = tuned.cache.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "tune", CHAT, "--config", str(tuned.config), *QUICK],
                            cwd=REPO, env={**os.environ, "EDGEFLEET_CONFIG": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        child = None
        while child is None and time.monotonic() < deadline and proc.poll() is None:
            child = next((c for c in psutil.Process(proc.pid).children()
                          if "runtime.tuning.measure" in " ".join(c.cmdline())), None)
            time.sleep(0.05)
        assert child is not None, "no measuring child started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "edgefleet: stopped; the cached tuning is unchanged", err
    assert tuned.cache.read_bytes() == before
    assert [p.name for p in tuned.cache.parent.iterdir()] == [tuned.cache.name]  # no temporary file left
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_a_crash_is_remembered_until_asked_to_retry(tuned: Tuned) -> None:
    """The crash is not injected this time: a candidate that crashed on this machine and build
    is listed as unsafe without being run again; `--retry-unsafe` runs it."""
    again = edgefleet("tune", CHAT, "--config", str(tuned.config), *QUICK)
    assert again.returncode == 0, again.stderr
    crash = next(c for c in tuned.record()["candidates"] if c["label"] == CRASH)
    assert crash["status"] == "unsafe" and crash["seconds"] == 0, crash
    assert "crashed in an earlier run on this machine and build" in crash["reason"] and "SIGABRT" in crash["reason"]
    row = next(line for line in again.stdout.splitlines() if line.startswith(CRASH + " "))
    assert "unsafe" in row and "earlier run" in row, row
    retried = edgefleet("tune", CHAT, "--config", str(tuned.config), *QUICK, "--retry-unsafe")
    assert retried.returncode == 0, retried.stderr
    crash = next(c for c in tuned.record()["candidates"] if c["label"] == CRASH)
    assert crash["status"] in ("ok", "rejected") and crash["seconds"] > 0, crash


async def test_an_agent_with_the_same_fingerprint_applies_the_cache_without_measuring(tuned: Tuned) -> None:
    before = tuned.cache.stat().st_mtime_ns, tuned.cache.read_bytes()
    choice = tuned.record()["choice"]
    config = agent_config(tuned.config)
    async with start_agent(config) as agent:  # mode before_ready: READY after any measuring
        _, text = await agent.get("/metrics")
        line = metric_line(str(text), "edgefleet_model_tuned_info", CHAT)
        assert line is not None and line.endswith(" 1.0"), text
        assert f'kv_cache_type="{choice["kv_cache_type"]}"' in line
        assert f'flash_attn="{"true" if choice["flash_attn"] else "false"}"' in line
        tuned_field = model_fields(_models(agent), None)[CHAT]["tuned"]
        assert tuned_field["kv_cache_type"] == choice["kv_cache_type"]
        assert tuned_field["fingerprint"] == tuned.record()["fingerprint"][:16]
    assert (tuned.cache.stat().st_mtime_ns, tuned.cache.read_bytes()) == before
    doctor = edgefleet("doctor", "--config", str(tuned.config), timeout=120)
    line = next(line for line in doctor.stdout.splitlines() if f"tuning {CHAT}:" in line)
    assert line.startswith("[ok  ]") and "KV cache" in line and tuned.record()["fingerprint"][:16] in line, line


def _models(agent):  # the registry, under its AppKey
    from agent.context import MODELS

    return agent.app[MODELS]


def copied_bundle(tuned: Tuned, name: str) -> Path:
    """A copy of the demo chat bundle outside the store (its model file a file of its own)."""
    source = (tuned.state / "models" / CHAT / "current").resolve()
    target = tuned.state / "bundles" / name
    target.mkdir(parents=True)
    shutil.copy(source / "model.toml", target / "model.toml")
    shutil.copy(source / "model.gguf", target / "model.gguf")
    return target


async def test_a_changed_model_file_is_measured_again(tuned: Tuned, tmp_path: Path) -> None:
    old = tuned.record()
    bundle = copied_bundle(tuned, "changed")
    with open(bundle / "model.gguf", "ab") as handle:  # other bytes: another sha256 (llama.cpp ignores a tail)
        handle.write(b"edgefleet-tuning-test")
    # a budget spent by the first candidate: the default settings are measured, the others skipped
    config = write_config(tmp_path / "agent.toml", tuned.state, "before_ready", model_path=str(bundle), budget_s=0.1)
    async with start_agent(agent_config(config)) as agent:
        record = tuned.record()
        assert record["tuned_at"] > old["tuned_at"]
        assert record["model"]["sha256"] != old["model"]["sha256"] and record["fingerprint"] != old["fingerprint"]
        assert [c["status"] for c in record["candidates"]] == ["ok", "skipped", "skipped"], record["candidates"]
        _, text = await agent.get("/metrics")
        assert metric_line(str(text), "edgefleet_model_tuned_info", CHAT) is not None


async def test_settings_in_the_bundle_and_the_config_win_over_the_measurement(tuned: Tuned, tmp_path: Path) -> None:
    bundle = tuned.state / "bundles" / "changed"  # measured by the previous test
    toml = (bundle / "model.toml").read_text().replace('kv_cache_type = "auto"', 'kv_cache_type = "q8_0"')
    (bundle / "model.toml").write_text(toml)
    record = tuned.record()
    record["choice"] = {"kv_cache_type": "f16", "flash_attn": False, "prompt_chunk": 128, "n_threads": 2,
                        "n_threads_batch": 2, "n_batch": 256, "cpu_repack": False}
    tuned.cache.write_text(json.dumps(record))
    config = write_config(tmp_path / "agent.toml", tuned.state, "off", model_path=str(bundle), threads=1)
    async with start_agent(agent_config(config)) as agent:
        _, text = await agent.get("/metrics")
        line = metric_line(str(text), "edgefleet_model_tuned_info", CHAT)
        assert line is not None, text
        # the bundle pins the KV cache (and so flash attention), the config the threads; the rest is tuned
        for label in ('kv_cache_type="q8_0"', 'flash_attn="true"', 'threads="1"', 'threads_batch="1"',
                      'prompt_chunk="128"', 'ubatch="256"'):
            assert label in line, line


async def test_a_broken_cache_file_leaves_the_model_on_its_defaults(tuned: Tuned, tmp_path: Path) -> None:
    bundle = tuned.state / "bundles" / "changed"  # the cache's fingerprint is this file's
    config = write_config(tmp_path / "agent.toml", tuned.state, "off", model_path=str(bundle))
    wrong_choice = json.dumps({**tuned.record(), "choice": {"kv_cache_type": "f32"}})
    for broken in ("{not json", wrong_choice):
        tuned.cache.write_text(broken)
        async with start_agent(agent_config(config)) as agent:
            status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2})
            assert status == 200, body
            _, text = await agent.get("/metrics")
            assert metric_line(str(text), "edgefleet_model_tuned_info", CHAT) is None
    tuned.cache.write_text("{not json")
    doctor = edgefleet("doctor", "--config", str(config), timeout=120)
    line = next(line for line in doctor.stdout.splitlines() if f"tuning {CHAT}:" in line)
    assert line.startswith("[warn]") and "cannot use the cached tuning" in line, line
async def test_in_the_background_the_agent_serves_first_then_measures_and_reloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode: READY on the defaults, measured after, reloaded with the choice. The
    defaults' child aborts (so the one other candidate, n_batch 256, is the choice and the
    model must be reloaded), and the agent serves on through it."""
    state = tmp_path / "state"
    build_demo_bundles(state / "models")
    monkeypatch.setenv("EDGEFLEET_TUNING_CRASH", "default")
    config = write_config(tmp_path / "agent.toml", state, "background", knobs="ubatch")
    async with start_agent(agent_config(config)) as agent:
        _, text = await agent.get("/metrics")
        assert metric_line(str(text), "edgefleet_model_tuned_info", CHAT) is None  # READY before measuring
        status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2})
        assert status == 200, body
        deadline = time.monotonic() + 300
        line = None
        while line is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            _, text = await agent.get("/metrics")
            line = metric_line(str(text), "edgefleet_model_tuned_info", CHAT)
        assert line is not None and 'ubatch="256"' in line, line
        record = json.loads((state / "tuning" / f"{CHAT}.json").read_text())
        outcomes = [(c["label"], c["status"]) for c in record["candidates"]]
        assert outcomes == [("default", "unsafe"), ("ubatch=256", "ok")], record["candidates"]
        status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2})
        assert status == 200, body
