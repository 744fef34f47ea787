"""The agent inside the rules its unit sets: no writable-and-executable memory.

systemd's MemoryDenyWriteExecute= is a seccomp filter; Linux 6.3+ has the same rule
built in (prctl PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), inherited across exec. Running
the agent under it, loading both demo models and answering a chat and an embedding,
shows that llama.cpp, onnxruntime and ctypes' callbacks (libffi) live with the unit's
MemoryDenyWriteExecute=yes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import CHAT, EMBED, free_port
from service_process import ServiceProcess, deny_write_execute, kernel_has_mdwe, write_config


@pytest.mark.skipif(not kernel_has_mdwe(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_the_rule_is_in_force_for_the_child() -> None:
    """The check below is not vacuous: under the rule a writable+executable mapping fails."""
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    denied = subprocess.run([sys.executable, "-c", probe], preexec_fn=deny_write_execute,
                            capture_output=True, text=True, check=False)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not kernel_has_mdwe(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
async def test_agent_serves_both_models_with_write_execute_memory_denied(tmp_path: Path, state_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agent = ServiceProcess(write_config(tmp_path / "agent.toml", state_dir, port, [CHAT, EMBED]), tmp_path,
                           preexec_fn=deny_write_execute)
    try:
        ready = await agent.notify.wait_for("READY", "1")
        assert ready.fields["STATUS"] == f"serving 2 model(s): {EMBED}, {CHAT}", agent.log()
        async with aiohttp.ClientSession() as http:
            chat = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            async with http.post(url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"]
            async with http.post(url + "/v1/embeddings", json={"model": EMBED, "input": "hello"}) as resp:
                assert resp.status == 200
        agent.signal(signal.SIGTERM)
        assert await agent.wait_exit(timeout=30) == 0
    finally:
        agent.stop()
