"""The README's curl tour, run as written against a live agent, so the README stays true."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[str]:
    """Each `curl` command of the tour's shell block, continuation lines included."""
    text = README.read_text()
    section = text[text.index("## A short tour"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the tour has no sh block"
    commands: list[str] = []
    for line in block.group(1).splitlines():
        if line.startswith("curl "):
            commands.append(line)
        elif commands and line and not line.startswith("#"):
            commands[-1] += "\n" + line
    return commands


COMMANDS = tour_commands()


def test_the_tour_covers_every_api():
    joined = "\n".join(COMMANDS)
    for path in ("/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v2/models/", "/infer",
                 "/readyz", "/metrics"):
        assert path in joined, f"the README tour lost its {path} example"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("\n")[0][:60] for c in COMMANDS])
async def test_readme_curl_answers(agent, command):
    port = agent.url.rsplit(":", 1)[1]
    # --fail-with-body: an HTTP error status makes curl exit non-zero
    runnable = command.replace("localhost:8080", f"127.0.0.1:{port}").replace(
        "curl ", "curl --fail-with-body ", 1)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", runnable, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"{command}\n{err.decode()}{out.decode()}"
    text = out.decode()
    assert text.strip(), command
    if "stream" in command:
        assert text.rstrip().endswith("data: [DONE]")
    elif "|" not in command:
        answer = json.loads(text)  # a whole JSON answer
        message = answer.get("choices", [{}])[0].get("message", {})
        if "response_format" in command:  # the JSON answer parses and has the schema's fields
            assert set(json.loads(message["content"])) == {"room", "on"}
        if '"tools"' in command:  # the call's arguments parse
            assert json.loads(message["tool_calls"][0]["function"]["arguments"])["location"]
