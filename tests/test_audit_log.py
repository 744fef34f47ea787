"""The tamper-evident audit log, as an operator and a fleet owner check it.

A real agent (signed updates from a real hub, a real mosquitto) records the steps of an
update (actor ``hub``) and the operator's rollback through the HTTP endpoint (actor
``local``), seals them with checkpoints signed by its device key (whose public half is in
its birth message), and forwards every record through the outbox: records made while the
broker is down arrive after it comes back, and `edgefleet hub audit verify` passes on them.
Then the real log file is edited the ways an intruder would — a field changed, a line
deleted, two lines swapped, the tail cut past a checkpoint, a torn last write — and
`edgefleet audit verify` names each at the right seq and exits 1. Rotation keeps the chain,
the keys CLI's offline appends interleave safely, and a full disk keeps serving while the
loss is counted, alerted, and never leaves half a record.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import EMBED, demo_config, free_port, start_agent
from mqtt_broker import MosquittoBroker, Watcher
from test_full_disk import tiny_disk  # noqa: F401 - the fixture
from update_env import DEVICE, GROUP, PREFIX, create_hub, embedding_state, make_release, publish_release

from agent.context import AUDIT
from agent.fleet.updates import UPDATES
from security.audit import AuditLog, AuditSettings, append_offline, load_or_create_device_key
from security.audit_chain import parse_line
from sync.alerts.settings import AlertSettings
from sync.hub.server import hub_app
from sync.mqtt import MqttSettings
from sync.update_settings import UpdateSettings

REPO = Path(__file__).resolve().parent.parent
AUDIT_TOPIC = f"{PREFIX}/devices/{DEVICE}/audit"
STATE_TOPIC = f"{PREFIX}/devices/{DEVICE}/state"


def cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False, env={"PATH": "/usr/bin:/bin", "EDGEFLEET_CONFIG": ""})
    return done.returncode, done.stdout, done.stderr


def fill(disk: Path) -> Path:
    """Write unbuffered until the filesystem is full; returns the file (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run of a real agent: update steps, a rollback, a broker outage; what it left behind."""
    root = embedding_state(tmp_path_factory.mktemp("audit"))
    broker = MosquittoBroker(root, persistence_dir=root / "mosquitto-db")
    broker.start()
    try:
        yield asyncio.run(_run_agent(root, broker)) | {"root": root, "broker": broker}
    finally:
        broker.stop()


async def _run_agent(root: Path, broker: MosquittoBroker) -> dict[str, Any]:
    hub = create_hub(root / "hub", root / "state", (EMBED,))
    runner = web.AppRunner(hub_app(hub.dir / "repository"))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = replace(
        demo_config(root / "state", (EMBED,)),
        mqtt=MqttSettings(host=broker.host, port=broker.port, device_id=DEVICE, group=GROUP, reconnect_min_s=0.2,
                          reconnect_max_s=0.5),
        updates=UpdateSettings(hub_url=f"http://127.0.0.1:{port}", trust_root=str(hub.dir / "trust-root.json"),
                               poll_interval_s=600, health_checks=2, health_check_interval_s=0.1, min_free_mb=0),
        audit=AuditSettings(checkpoint_every=4),
    )
    release = make_release(root / "state" / "models" / EMBED / "current", root / "release-2", "2",
                           onnx_note="release 2")
    out: dict[str, Any] = {}
    # the hub's capture keeps a persistent session, as a hub that must not miss a record does
    with Watcher(broker, AUDIT_TOPIC, STATE_TOPIC, session_expiry_s=3600) as watcher:
        try:
            async with start_agent(config) as agent:
                await asyncio.wait_for(agent.app[UPDATES].reconciled.wait(), 30)
                publish_release(hub, EMBED, release)
                outcome = await agent.app[UPDATES].check_now()
                out["update"] = outcome
                status, body, _ = await agent.post(f"/v2/repository/models/{EMBED}/rollback")
                out["rollback"] = (status, body)
                out["birth"] = json.loads((await watcher.wait(STATE_TOPIC))[-1].payload)
                await watcher.wait(AUDIT_TOPIC, count=8)
                broker.stop()  # an outage: what is recorded now waits in the outbox
                audit = agent.app[AUDIT]
                for n in range(3):
                    audit.record("local", "test.during-outage", f"mark-{n}", "ok")
                assert await asyncio.to_thread(audit.flush)
                out["written_in_outage"] = audit.written
                broker.start()
                for _ in range(300):  # the agent reconnects with backoff, then sends the outbox
                    if any(b"mark-2" in m.payload for m in watcher.on(AUDIT_TOPIC)):
                        break
                    await asyncio.sleep(0.1)
                status, _ = await agent.get("/readyz")
                out["ready"] = status
                # the hub verifies what it captured so far, the key read from the device's retained birth
                capture = root / "capture.jsonl"
                capture.write_bytes(b"".join(m.payload + b"\n" for m in watcher.on(AUDIT_TOPIC)))
                out["hub_verify"] = await asyncio.to_thread(
                    cli, "hub", "audit", "verify", "--device", DEVICE, "--mqtt", f"{broker.host}:{broker.port}",
                    str(capture))
            # stopped: the last checkpoint went to the outbox before the link closed
            out["forwarded"] = [m.payload for m in watcher.on(AUDIT_TOPIC)]
        finally:
            await runner.cleanup()
    return out


def test_update_steps_and_the_rollback_are_recorded_with_their_actors(world: dict[str, Any]) -> None:
    assert world["rollback"][0] == 200, world["rollback"]
    log = records(world["root"] / "state" / "audit" / "audit.log")
    by_action = [(r["actor"], r["action"], r["target"], r["outcome"]) for r in log]
    assert ("hub", "update.downloading", f"{EMBED}@2", "ok") in by_action
    assert ("hub", "update.active", f"{EMBED}@2", "ok") in by_action
    rollback = next(r for r in log if r["action"] == "update.rolled-back")
    assert (rollback["actor"], rollback["outcome"], rollback["detail"]["code"]) == ("local", "ok", "operator")
    checkpoints = [r for r in log if r["action"] == "audit.checkpoint"]
    assert checkpoints and log[-1]["action"] == "audit.checkpoint"  # sealed at stop
    assert world["birth"]["device_key"] == checkpoints[-1]["detail"]["key"]
    assert (world["root"] / "state" / "device-key.pem").stat().st_mode & 0o777 == 0o600


def test_verify_passes_on_the_untouched_log(world: dict[str, Any]) -> None:
    code, out, err = cli("audit", "verify", "--state-dir", str(world["root"] / "state"))
    assert code == 0, out + err
    assert out.startswith("ok: seq 1..") and "signed by ed25519:" in out


def _tampered(world: dict[str, Any], tmp_path: Path, edit: Any) -> tuple[int, str, dict[str, Any]]:
    """Copy the log (and the checkpoint kept beside it), edit the copy, verify it with the key
    from the birth message."""
    source = world["root"] / "state" / "audit"
    (tmp_path / "audit.checkpoint").write_bytes((source / "audit.checkpoint").read_bytes())
    lines = (source / "audit.log").read_bytes().splitlines(keepends=True)
    target = tmp_path / "audit.log"
    target.write_bytes(b"".join(edit(lines)))
    code, out, err = cli("audit", "verify", str(target), "--public-key", world["birth"]["device_key"],
                         "--state-dir", str(tmp_path))
    assert not err, err
    return code, out, {json.loads(line)["action"]: json.loads(line)["seq"] for line in lines}


def test_a_changed_field_is_named_at_its_seq(world: dict[str, Any], tmp_path: Path) -> None:
    def edit(lines: list[bytes]) -> list[bytes]:
        return [line.replace(b'"outcome":"ok"', b'"outcome":"denied"') if b"update.rolled-back" in line else line
                for line in lines]

    code, out, seqs = _tampered(world, tmp_path, edit)
    assert (code, out.strip()) == (1, f"tampered: seq {seqs['update.rolled-back']} (edited): seq "
                                      f"{seqs['update.rolled-back']} was edited: its content does not match its hash")


def test_a_deleted_line_is_named(world: dict[str, Any], tmp_path: Path) -> None:
    code, out, seqs = _tampered(world, tmp_path, lambda lines: [ln for ln in lines if b"update.rolled-back" not in ln])
    assert code == 1 and out.startswith(f"tampered: seq {seqs['update.rolled-back']} (removed)"), out


def test_two_swapped_lines_are_named(world: dict[str, Any], tmp_path: Path) -> None:
    def edit(lines: list[bytes]) -> list[bytes]:
        return [lines[0], lines[2], lines[1], *lines[3:]]

    code, out, _ = _tampered(world, tmp_path, edit)
    assert code == 1 and out.startswith("tampered: seq 2 (reordered)"), out


def test_a_tail_cut_past_a_checkpoint_is_named(world: dict[str, Any], tmp_path: Path) -> None:
    code, out, _ = _tampered(world, tmp_path, lambda lines: lines[:5])
    assert code == 1 and out.startswith("tampered: seq 6 (truncated)"), out


def test_a_torn_last_write_is_truncation_and_the_writer_repairs_it(world: dict[str, Any], tmp_path: Path) -> None:
    code, out, _ = _tampered(world, tmp_path, lambda lines: [*lines, lines[1][:40]])
    assert code == 1 and "(truncated)" in out and "half written" in out, out
    state = tmp_path / "state"
    (state / "audit").mkdir(parents=True)
    key = load_or_create_device_key(state)
    (state / "audit" / "audit.log").write_bytes((tmp_path / "audit.log").read_bytes())
    log = AuditLog(state / "audit", DEVICE, key)
    log.open()
    log.close()
    repaired = records(state / "audit" / "audit.log")
    assert [r["action"] for r in repaired[-2:]] == ["audit.repaired", "audit.checkpoint"]
    assert repaired[-2]["detail"]["bytes_cut"] == 40


def test_records_made_during_a_broker_outage_arrive_and_the_hub_verifies_them(
        world: dict[str, Any], tmp_path: Path) -> None:
    assert world["ready"] == 200
    forwarded = [json.loads(p) for p in world["forwarded"]]
    assert [r["target"] for r in forwarded if r["action"] == "test.during-outage"] == ["mark-0", "mark-1", "mark-2"]
    assert forwarded[-1]["action"] == "audit.checkpoint"
    code, out, err = world["hub_verify"]
    assert code == 0 and out.startswith("ok: seq ") and "signed by ed25519:" in out, out + err
    # everything forwarded, the final checkpoint included, verifies with the key the hub pinned
    capture = tmp_path / "dev-1.audit.jsonl"
    capture.write_bytes(b"".join(p + b"\n" for p in world["forwarded"]))
    key = world["birth"]["device_key"]
    code, out, err = cli("hub", "audit", "verify", "--device", DEVICE, "--public-key", key, str(capture))
    assert code == 0, out + err
    # a checkpoint the hub keeps apart: a copy cut short of it says so
    lines = capture.read_bytes().splitlines(keepends=True)
    capture.write_bytes(b"".join(lines[:-3]))
    (tmp_path / "kept.checkpoint").write_bytes(lines[-1])
    code, out, _ = cli("hub", "audit", "verify", "--device", DEVICE, "--public-key", key,
                       "--checkpoint", str(tmp_path / "kept.checkpoint"), str(capture))
    assert code == 1 and "(truncated)" in out, out


# ---- rotation, offline appends, a full disk -------------------------------------------------------


def test_rotation_keeps_the_chain_and_offline_appends_interleave(tmp_path: Path) -> None:
    key = load_or_create_device_key(tmp_path)
    log = AuditLog(tmp_path / "audit", DEVICE, key, AuditSettings(max_bytes=4096, keep_files=2, checkpoint_every=10))
    log.open()
    keys_cli = threading.Thread(target=lambda: [append_offline(tmp_path, "local", "keys.add", f"key-{n}", "ok")
                                                for n in range(20)])
    keys_cli.start()
    for n in range(80):
        log.record("ops", "model.load", f"m-{n}", "ok")
    keys_cli.join()
    log.close()
    files = [tmp_path / "audit" / name for name in ("audit.log.2", "audit.log.1", "audit.log")]
    chained = [records(f) for f in files]
    for before, after in itertools.pairwise(chained):
        assert after[0]["action"] == "audit.rotated" and after[0]["prev"] == before[-1]["hash"]
        assert before[-1]["action"] == "audit.checkpoint"
    every = [r for part in chained for r in part]
    assert sum(r["action"] == "keys.add" for r in every) + sum(r["action"] == "model.load" for r in every) > 0
    code, out, err = cli("audit", "verify", "--state-dir", str(tmp_path))
    assert code == 0, out + err
    assert "note: the log starts at seq" not in out  # the oldest kept file begins at a rotation


async def test_a_full_audit_disk_keeps_serving_counts_the_loss_and_alerts(tiny_disk: Path, state_dir: Path,  # noqa: F811
                                                                         ) -> None:
    config = replace(demo_config(state_dir, (EMBED,)), audit=AuditSettings(dir=str(tiny_disk / "audit")),
                     alerts=AlertSettings(interval_s=0.2))
    async with start_agent(config) as agent:
        audit = agent.app[AUDIT]
        audit.record("local", "test.before", "x", "ok")
        assert await asyncio.to_thread(audit.flush)
        filler = await asyncio.to_thread(fill, tiny_disk)
        for n in range(40):
            audit.record("local", "test.full", f"r-{n}" * 20, "ok")
        assert await asyncio.to_thread(audit.flush)
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "still serving"})
        assert status == 200
        dropped = await agent.metric("edgefleet_audit_dropped_total")
        assert dropped > 0 and dropped == audit.dropped
        for _ in range(50):
            if await agent.metric("edgefleet_alert_firing", rule="audit_dropping", severity="warning") == 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("audit_dropping did not fire")
        log = tiny_disk / "audit" / "audit.log"
        assert all(parse_line(line) for line in log.read_bytes().splitlines(keepends=True))  # no half record
        filler.unlink()
        audit.record("local", "test.after", "y", "ok")
        assert await asyncio.to_thread(audit.flush)
        tail = records(log)[-2:]
        assert [r["action"] for r in tail] == ["audit.dropped", "test.after"]
        assert tail[0]["detail"]["count"] == dropped
    code, out, err = cli("audit", "verify", "--state-dir", str(state_dir), str(log))
    assert code == 0, out + err


# ---- the device key, loaded at the first checkpoint ---------------------------------------------


def corrupt_device_key(state: Path) -> Path:
    """A device key that looks right (an Ed25519 PKCS#8 PEM block, 0600) but does not parse: its
    DER is cut one byte short, as a bad restore or a flipped disk block would leave it."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    der = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    path = state / "device-key.pem"
    state.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(der[:-1]) + b"\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    return path


async def test_a_bad_device_key_is_reported_at_the_first_checkpoint_and_serving_goes_on(tmp_path: Path) -> None:
    from test_doctor_checks import doctor, finding

    state = tmp_path / "state"
    corrupt_device_key(state)
    config = replace(demo_config(state, ()), audit=AuditSettings(checkpoint_every=2),
                     alerts=AlertSettings(interval_s=0.2))
    async with start_agent(config) as agent:
        audit = agent.app[AUDIT]  # the log is on: records are chained, only the seal is missing
        audit.record("local", "test.one", "x", "ok")
        audit.record("local", "test.two", "y", "ok")  # the first checkpoint is due: the key fails to load
        assert await asyncio.to_thread(audit.flush)
        assert (await agent.get("/readyz"))[0] == 200
        assert await agent.metric("edgefleet_audit_dropped_total") == 1
        for _ in range(50):
            if await agent.metric("edgefleet_alert_firing", rule="audit_dropping", severity="warning") == 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("audit_dropping did not fire")
        audit.record("local", "test.three", "z", "ok")
        assert await asyncio.to_thread(audit.flush)
        tail = records(state / "audit" / "audit.log")[-2:]
        assert [r["action"] for r in tail] == ["audit.dropped", "test.three"]
        assert tail[0]["detail"]["count"] == 1
        assert "the device key cannot sign" in tail[0]["detail"]["reason"]
        assert "device-key.pem" in tail[0]["detail"]["reason"]
    code, out, err = cli("audit", "verify", "--state-dir", str(state), "--public-key", "ed25519:" + "A" * 43 + "=")
    assert code == 0 and "0 checkpoints" in out, out + err  # the chain holds; nothing was signed
    code, out = doctor(tmp_path, f'state_dir = "{state}"\n[server]\nport = {free_port()}\n')
    [line] = finding(out, "device key")
    assert line.startswith("[FAIL] device key: ") and "not a readable PEM private key" in line, line
    assert "fix: restore the key" in line and code == 1
