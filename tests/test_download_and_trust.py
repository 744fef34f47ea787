"""The resumable downloader against a real HTTP server, and trust roots: rotation a device
follows, a rotation it refuses, keys on disk. No agent needed here: these are the parts
the end-to-end tests build on, checked where a failure says the most."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port
from update_env import Mirror

from security.errors import KeyStoreError, SignatureRefused, TrustRootError
from security.keys import KeyStore
from security.trust import parse_trust_root, rotated, sign_root
from sync.downloader import Downloader, DownloadStats, Fetch
from sync.errors import HubUnreachable
from sync.hub.repository import HubRepository
from sync.hub.server import hub_app
from sync.tuf_client import HubClient

SIZE = 6 * 1024 * 1024 + 123


@pytest.fixture(scope="module")
def payload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("payload")
    (root / "blob.bin").write_bytes(os.urandom(SIZE))
    return root


@pytest.fixture
async def mirror(payload_dir: Path) -> AsyncIterator[Mirror]:
    mirror = Mirror(payload_dir)
    await mirror.start()
    yield mirror
    await mirror.stop()


def fetch_for(mirror: Mirror, dest: Path) -> Fetch:
    data = (mirror.root / "blob.bin").read_bytes()
    return Fetch(f"{mirror.url}/blob.bin", len(data), hashlib.sha256(data).hexdigest(), dest)


async def test_a_download_cut_halfway_resumes_and_fetches_no_byte_twice(mirror: Mirror, tmp_path: Path) -> None:
    mirror.on("blob.bin", cut_after=SIZE // 2)
    stats = DownloadStats()
    async with aiohttp.ClientSession() as session:
        path = await Downloader(session, backoff_s=0.05).fetch(fetch_for(mirror, tmp_path / "x.part"), stats=stats)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fetch_for(mirror, path).sha256
    first, second = mirror.ranges["blob.bin"]
    assert first is None and second is not None
    resumed_at = int(second.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= SIZE // 2
    assert stats.requests == 2 and stats.restarts == 0
    assert stats.bytes_received == SIZE  # every byte arrived exactly once


async def test_a_stalled_download_is_cut_by_the_read_timeout_and_resumed(mirror: Mirror, tmp_path: Path) -> None:
    mirror.on("blob.bin", stall_after=SIZE // 4)  # slow retrieval: the server goes quiet
    stats = DownloadStats()
    async with aiohttp.ClientSession() as session:
        downloader = Downloader(session, backoff_s=0.05, read_timeout_s=0.5)
        path = await downloader.fetch(fetch_for(mirror, tmp_path / "x.part"), stats=stats)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fetch_for(mirror, path).sha256
    assert stats.requests == 2 and stats.bytes_received == SIZE
    first, second = mirror.ranges["blob.bin"]
    assert first is None and second is not None and int(second[6:-1]) >= SIZE // 4


async def test_a_partial_file_left_by_a_killed_agent_is_rehashed_and_continued(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "x.part"
    dest.write_bytes((mirror.root / "blob.bin").read_bytes()[: SIZE // 3])
    stats = DownloadStats()
    async with aiohttp.ClientSession() as session:
        await Downloader(session).fetch(fetch_for(mirror, dest), stats=stats)
    assert mirror.ranges["blob.bin"] == [f"bytes={SIZE // 3}-"]
    assert stats.resumed_from == SIZE // 3 and stats.bytes_received == SIZE - SIZE // 3


async def test_a_server_that_ignores_range_makes_us_start_over_not_append(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "x.part"
    dest.write_bytes((mirror.root / "blob.bin").read_bytes()[:1000])
    mirror.on("blob.bin", ignore_range=True)
    stats = DownloadStats()
    async with aiohttp.ClientSession() as session:
        path = await Downloader(session).fetch(fetch_for(mirror, dest), stats=stats)
    assert stats.restarts == 1 and path.stat().st_size == SIZE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fetch_for(mirror, path).sha256


async def test_the_hub_server_answers_range_with_206_and_content_range(payload_dir: Path) -> None:
    runner = web.AppRunner(hub_app(payload_dir))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/blob.bin", headers={"Range": "bytes=100-"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes 100-{SIZE - 1}/{SIZE}"
                assert len(await resp.read()) == SIZE - 100
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status in (403, 404)  # no listing
    finally:
        await runner.cleanup()


# ---- trust roots ---------------------------------------------------------------------------------------


@pytest.fixture
async def served_hub(tmp_path: Path) -> AsyncIterator[tuple[HubRepository, str]]:
    repo = HubRepository.create(tmp_path / "hub", {"root": 2}, {"root": 2})
    runner = web.AppRunner(hub_app(repo.dir / "repository"))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield repo, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_device_follows_a_root_rotation_signed_by_old_and_new_keys(served_hub, tmp_path: Path) -> None:
    repo, url = served_hub
    provisioned = (repo.dir / "trust-root.json").read_bytes()  # root v1, on the device since day one
    old_root_keys = set(repo.root().roles["root"].keyids)
    repo.rotate_key("root")
    repo.rotate_key("timestamp")
    assert set(repo.root().roles["root"].keyids).isdisjoint(old_root_keys)
    client = HubClient(tmp_path / "tuf", url, provisioned, "lab", "dev-1")
    view = await asyncio.to_thread(client.refresh)  # ngclient is synchronous; the hub serves on this loop
    assert view.targets_version >= 1
    assert sorted(p.name for p in (tmp_path / "tuf" / "root_history").iterdir()) == [
        "1.root.json",
        "2.root.json",
        "3.root.json",
    ]


async def test_a_root_rotation_signed_only_by_the_new_keys_is_refused(served_hub, tmp_path: Path) -> None:
    repo, url = served_hub
    provisioned = (repo.dir / "trust-root.json").read_bytes()
    thief = KeyStore(tmp_path / "thief")
    stolen = [thief.generate("root") for _ in range(2)]
    current = repo.root()
    forged = rotated(
        current, "root", [k.public_key for k in stolen], list(current.roles["root"].keyids), current.expires
    )
    with pytest.raises(SignatureRefused, match="previous"):
        sign_root(forged, [k.signer for k in stolen], previous=current)  # the hub would not write it
    forged.signatures.clear()
    for key in stolen:
        forged.sign(key.signer, append=True)
    (repo.metadata_dir / "2.root.json").write_bytes(forged.to_bytes())  # a compromised mirror does
    with pytest.raises(SignatureRefused, match="root"):
        await asyncio.to_thread(HubClient(tmp_path / "tuf", url, provisioned, "lab", "dev-1").refresh)


def test_a_trust_root_must_be_self_signed_by_its_threshold(served_hub) -> None:
    repo, _ = served_hub
    good = (repo.dir / "trust-root.json").read_bytes()
    assert parse_trust_root(good).signed.version == 1
    md = parse_trust_root(good)
    md.signatures.popitem()  # one of the two root signatures missing
    with pytest.raises(TrustRootError, match="1 of the 2"):
        parse_trust_root(md.to_bytes())
    with pytest.raises(TrustRootError):
        parse_trust_root(b"{not json")


def test_keys_are_written_owner_only_and_refused_when_readable_by_others(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    key = store.generate("targets")
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert [k.keyid for k in store.keys("targets")] == [key.keyid]
    os.chmod(key.path, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        store.keys()


def test_keys_encrypted_with_a_passphrase_need_it(tmp_path: Path) -> None:
    key = KeyStore(tmp_path / "keys", passphrase=b"correct horse").generate("root")
    assert b"ENCRYPTED" in key.path.read_bytes()
    assert KeyStore(tmp_path / "keys", passphrase=b"correct horse").keys()[0].keyid == key.keyid
    with pytest.raises(KeyStoreError, match="EDGEFLEET_HUB_KEY_PASSPHRASE"):
        KeyStore(tmp_path / "keys").keys()


def test_a_threshold_above_the_key_count_is_refused_at_rotation(served_hub) -> None:
    repo, _ = served_hub
    with pytest.raises(TrustRootError, match="threshold"):
        repo.rotate_key("root", revoke=list(repo.root().roles["root"].keyids), count=1)


# ---- metadata over a bad network: every failure is hub-unreachable, every look has a deadline -----------


@pytest.fixture
async def mirrored_hub(tmp_path: Path) -> AsyncIterator[tuple[HubRepository, Mirror]]:
    repo = HubRepository.create(tmp_path / "hub")
    async with Mirror(repo.dir / "repository") as mirror:
        yield repo, mirror


async def test_metadata_cut_mid_file_is_hub_unreachable_with_its_cause(mirrored_hub, tmp_path: Path) -> None:
    repo, mirror = mirrored_hub
    mirror.on("timestamp.json", cut_after=100)  # the connection drops 100 bytes into the file
    client = HubClient(tmp_path / "tuf", mirror.url, (repo.dir / "trust-root.json").read_bytes(), "lab", "dev-1")
    with pytest.raises(HubUnreachable, match=r"timestamp\.json") as caught:
        await asyncio.to_thread(client.refresh)
    assert "IncompleteRead" in str(caught.value) or "ended" in str(caught.value), caught.value
    view = await asyncio.to_thread(client.refresh)  # the next look, on a good connection, goes through
    assert view.targets_version >= 1


async def test_metadata_trickled_a_byte_a_second_is_given_up_at_the_refresh_deadline(
    mirrored_hub, tmp_path: Path
) -> None:
    repo, mirror = mirrored_hub
    mirror.on("timestamp.json", throttle_bps=1)  # every byte arrives well inside the read timeout
    client = HubClient(tmp_path / "tuf", mirror.url, (repo.dir / "trust-root.json").read_bytes(), "lab", "dev-1",
                       timeout_s=5, refresh_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(HubUnreachable, match="2s"):
        await client.refresh_async()
    assert time.monotonic() - started < 15  # not the ~25 minutes the file takes at 1 byte/s
