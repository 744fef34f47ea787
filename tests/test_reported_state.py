"""What a device reports beside what it runs: the retained `reported` message an operator
(and the rollout controller) reads to tell "updated" from "never heard of it".

Real agents (the embedding model), a real hub repository with real signatures served over
HTTP, a real mosquitto. Each test reads the retained message as a subscriber that comes
later would: the update service's health (ok, hub-unreachable since when, refused,
trust-root-unreadable, disabled), each model's desired version and where it came from
(group, rollout, pin) beside the active one, and the last job. The timer check is here too:
a release published without a doorbell reaches a connected device within one interval.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import EMBED, free_port, start_agent
from mqtt_broker import MosquittoBroker, Watcher, running_broker
from update_env import (
    DEVICE,
    PREFIX,
    Mirror,
    agent_config,
    create_hub,
    embedding_state,
    make_release,
    publish_release,
)

from security.desired import (
    DesiredModel,
    DesiredState,
    Rollout,
    bucket,
    desired_path,
    in_rollout,
    model_file_path,
    parse_desired,
)
from security.errors import DesiredStateRefused
from sync.hub.publish import current_desired
from sync.hub.repository import HubRepository

REPORTED = f"{PREFIX}/devices/{DEVICE}/reported"
V1 = "int8-1.0.0"
FILES = ("model.onnx", "model.toml", "tokenizer.json")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_state(tmp_path_factory.mktemp("reported"))


@pytest.fixture(scope="module")
def broker(env_dir: Path) -> MosquittoBroker:
    with running_broker(env_dir) as broker:
        yield broker


@pytest.fixture(scope="module")
def hub(env_dir: Path) -> HubRepository:
    return create_hub(env_dir / "hub", env_dir / "state", (EMBED,))


@pytest.fixture
async def mirror(hub: HubRepository) -> AsyncIterator[Mirror]:
    async with Mirror(hub.dir / "repository") as mirror:
        yield mirror


@pytest.fixture
def watcher(broker: MosquittoBroker) -> Watcher:
    with Watcher(broker, REPORTED) as w:
        yield w


def mark(watcher: Watcher) -> int:
    """Where the reported messages stand now: `reported_until(after=...)` reads only later ones."""
    return len(watcher.on(REPORTED))


async def reported_until(watcher: Watcher, check: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0,
                         after: int = 0) -> dict[str, Any]:
    """The first reported message (from the `after`-th on) that passes `check`; the assertion
    shows the last one seen."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    seen: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        for message in watcher.on(REPORTED)[after:]:
            seen = json.loads(message.payload)
            if check(seen):
                return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"no reported state passed the check within {timeout_s}s; last: {json.dumps(seen)}")


def retained_reported(broker: MosquittoBroker) -> dict[str, Any]:
    """What a subscriber that comes later reads: the retained message."""
    with Watcher(broker, REPORTED) as late:
        message = late.wait_for(REPORTED, timeout_s=10)[0]
    assert message.retain
    return json.loads(message.payload)


def write_group_state(hub: HubRepository, models: dict[str, DesiredModel]) -> int:
    """Sign a group desired state by hand (what `hub rollout` publishes), serial one higher."""
    previous = current_desired(hub, "group", "lab")
    serial = (previous.serial if previous else 0) + 1
    path = desired_path("group", "lab")
    state = DesiredState("group", "lab", serial, models)
    hub.publish_targets({path: hub.add_target_bytes(path, state.to_json())})
    return serial


def files_of(version: str) -> dict[str, str]:
    return {f: model_file_path(EMBED, version, f) for f in FILES}


async def test_a_device_reports_desired_beside_active_and_takes_an_undoorbelled_release_on_its_timer(
    env_dir: Path, hub: HubRepository, mirror: Mirror, broker: MosquittoBroker, watcher: Watcher
) -> None:
    config = agent_config(env_dir / "state", mirror.url, hub.dir / "trust-root.json", broker, (EMBED,),
                          check_interval_s=1.0, check_jitter=0.0)
    async with start_agent(config):
        first = await reported_until(watcher, lambda r: r["updates"]["last_success"] is not None)
        assert first["schema"] == "edgefleet.reported/1" and first["device_id"] == DEVICE
        assert first["group"] == "lab"
        assert first["updates"]["health"] == "ok" and first["updates"]["check_interval_s"] == 1.0
        model = first["models"][EMBED]
        assert model["desired"]["version"] == V1 and model["desired"]["origin"] == "group", model
        assert model["active"] == V1 and model["state"] == "ready"

        # a release signed with no doorbell rung: the timer finds it
        release = make_release(env_dir / "state" / "models" / EMBED / "current", env_dir / "rel-2", "2",
                               onnx_note="release 2")
        publish_release(hub, EMBED, release)
        # serving from the switch on, under its health check; then the job is done
        await reported_until(watcher, lambda r: r["models"][EMBED]["active"] == "2", timeout_s=90)
        done = await reported_until(watcher, lambda r: r["models"][EMBED]["job"] is None
                                    and r["models"][EMBED]["active"] == "2", timeout_s=30)
        assert done["models"][EMBED]["desired"]["version"] == "2"
        assert done["last_job"]["state"] == "active" and done["last_job"]["version"] == "2"
        assert done["last_job"]["from_version"] == V1
        assert done["jobs_last"][EMBED]["state"] == "active"
        assert done["models"][EMBED]["job"] is None
    # the retained message outlives the agent (a Last Will only rewrites `state`)
    late = retained_reported(broker)
    assert late["models"][EMBED]["active"] == "2"


async def test_a_device_rolls_forward_in_its_rollout_share_and_back_on_a_signed_pin(
    env_dir: Path, hub: HubRepository, mirror: Mirror, broker: MosquittoBroker, watcher: Watcher
) -> None:
    current = current_desired(hub, "group", "lab")
    assert current is not None
    base = current.models[EMBED]
    release = make_release(env_dir / "state" / "models" / EMBED / V1, env_dir / "rel-3", "3", onnx_note="release 3")
    publish_release(hub, EMBED, release)  # signs the files of 3 (and makes it the group's version) ...
    serial = write_group_state(hub, {EMBED: base})  # ... then the group goes back to the base version
    config = agent_config(env_dir / "state", mirror.url, hub.dir / "trust-root.json", broker, (EMBED,),
                          check_interval_s=1.0, check_jitter=0.0)
    async with start_agent(config):
        await reported_until(watcher, lambda r: r["models"][EMBED]["active"] == base.version)
        # a rollout whose share leaves this device out: nothing moves
        outside = bucket("00c0ffee", DEVICE) / 2
        rollout = Rollout("r-test", "3", files_of("3"), max(outside, 0.001), "00c0ffee", serial + 1)
        write_group_state(hub, {EMBED: DesiredModel(EMBED, base.version, base.files, base.serial, rollout=rollout)})
        left_out = await reported_until(watcher, lambda r: (r["models"][EMBED]["desired"] or {}).get("rollout")
                                        == "r-test", after=mark(watcher))
        assert left_out["models"][EMBED]["desired"]["origin"] == "group"
        assert left_out["models"][EMBED]["active"] == base.version
        # the next step's share takes it in: the rollout's version, reported as such
        inside = min(100.0, bucket("00c0ffee", DEVICE) + 1)
        rollout = Rollout("r-test", "3", files_of("3"), inside, "00c0ffee", serial + 1)
        seen = mark(watcher)
        write_group_state(hub, {EMBED: DesiredModel(EMBED, base.version, base.files, base.serial, rollout=rollout)})
        moved = await reported_until(watcher, lambda r: r["models"][EMBED]["active"] == "3", 90, after=seen)
        assert moved["models"][EMBED]["desired"] == {"version": "3", "origin": "rollout", "rollout": "r-test",
                                                     "serial": serial + 1}
        # abort: the rollout removed, the base pinned; the device goes back
        seen = mark(watcher)
        write_group_state(hub, {EMBED: DesiredModel(EMBED, base.version, base.files, base.serial, "pin")})
        back = await reported_until(watcher, lambda r: r["models"][EMBED]["active"] == base.version, 90, after=seen)
        assert back["models"][EMBED]["desired"]["origin"] == "pin"


async def test_a_hub_nobody_answers_for_is_reported_unreachable_since_when_and_retried_soon(
    env_dir: Path, hub: HubRepository, broker: MosquittoBroker, watcher: Watcher
) -> None:
    port = free_port()
    config = agent_config(env_dir / "state", f"http://127.0.0.1:{port}", hub.dir / "trust-root.json", broker,
                          (EMBED,), check_interval_s=3600.0, retry_min_s=0.5, check_jitter=0.0, poll=3600.0)
    async with start_agent(config) as agent:
        down = await reported_until(watcher, lambda r: r["updates"]["health"] == "hub-unreachable")
        assert f"127.0.0.1:{port}" in down["updates"]["message"], down["updates"]
        assert down["updates"]["code"] == "hub-unreachable"
        since = down["updates"]["since"]
        # still serving what it has
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": ["still here"]})
        assert status == 200, body
        # the next failed checks keep `since` where the trouble began
        seen = mark(watcher)
        later = await reported_until(watcher, lambda r: r["updates"]["last_check"] > since + 1.5, after=seen)
        assert later["updates"]["health"] == "hub-unreachable" and later["updates"]["since"] == since
        # the hub comes back: retried within the backoff (0.5 s doubling), not the hour's check
        seen = mark(watcher)
        async with Mirror(hub.dir / "repository", port=port):
            ok = await reported_until(watcher, lambda r: r["updates"]["health"] == "ok", after=seen, timeout_s=30)
        assert ok["updates"]["since"] > since and ok["updates"]["last_success"] >= ok["updates"]["since"]


async def test_an_unreadable_trust_root_and_updates_switched_off_are_reported(
    env_dir: Path, broker: MosquittoBroker, watcher: Watcher
) -> None:
    missing = env_dir / "no-such-root.json"
    config = agent_config(env_dir / "state", "http://127.0.0.1:9", missing, broker, (EMBED,))
    async with start_agent(config):
        bad = await reported_until(watcher, lambda r: r["updates"]["health"] == "trust-root-unreadable")
        assert str(missing) in bad["updates"]["message"]
    off = agent_config(env_dir / "state", "http://127.0.0.1:9", missing, broker, (EMBED,))
    off = off.with_overrides(updates=type(off.updates)())
    async with start_agent(off):
        disabled = await reported_until(watcher, lambda r: r["updates"]["health"] == "disabled")
        assert disabled["models"][EMBED]["active"] is not None
        assert disabled["models"][EMBED]["desired"] is None


# ---- rollout membership: pure -------------------------------------------------------------


def test_rollout_membership_is_fixed_per_device_and_only_grows_with_the_share() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    buckets = [bucket("5eed5eed", d) for d in devices]
    assert all(0 <= b < 100 for b in buckets)
    assert buckets == [bucket("5eed5eed", d) for d in devices]  # the same on every look
    # roughly uniform: a tenth of the fleet per tenth of the range
    for decile in range(10):
        share = sum(decile * 10 <= b < decile * 10 + 10 for b in buckets) / len(buckets)
        assert 0.07 < share < 0.13, (decile, share)
    assert abs(statistics.mean(buckets) - 50) < 3
    steps = [1.0, 10.0, 50.0, 100.0]
    members = [{d for d in devices if in_rollout(Rollout("r", "2", {}, p, "5eed5eed"), d)} for p in steps]
    assert all(a <= b for a, b in itertools.pairwise(members))
    assert members[-1] == set(devices)
    # another salt shuffles who goes first
    assert {d for d in devices if bucket("0badcafe", d) < 10} != members[1]


def test_a_rollout_with_a_bad_share_salt_or_scope_is_refused() -> None:
    rollout = Rollout("r-1", "2", files_of("2"), 10.0, "5eed5eed", 1)
    state = DesiredState("group", "lab", 1, {EMBED: DesiredModel(EMBED, V1, files_of(V1), 1, rollout=rollout)})
    parsed = parse_desired(state.to_json(), "group", "lab")
    assert parsed.models[EMBED].rollout == rollout
    body = json.loads(state.to_json())
    for field, value, words in (("percent", 0, "percent"), ("percent", 101, "percent"),
                                ("percent", float("nan"), "percent"), ("salt", "XYZ", "salt"),
                                ("serial", 2, "serial")):
        bad = json.loads(json.dumps(body))
        bad["models"][EMBED]["rollout"][field] = value
        with pytest.raises(DesiredStateRefused, match=words):
            parse_desired(json.dumps(bad).encode(), "group", "lab")
    wrong_files = json.loads(json.dumps(body))
    wrong_files["models"][EMBED]["rollout"]["files"] = files_of(V1)
    with pytest.raises(Exception, match="not at this release"):
        parse_desired(json.dumps(wrong_files).encode(), "group", "lab")
    device = json.loads(json.dumps(body))
    device["scope"], device["target"] = "device", DEVICE
    with pytest.raises(DesiredStateRefused, match="belongs to a group"):
        parse_desired(json.dumps(device).encode(), "device", DEVICE)
