"""Both CPU weight paths really load and generate: repacking on (AVX2/ARM) and off (AMX)."""

from __future__ import annotations

import pytest
from conftest import CHAT

from runtime.backend import GenerationRequest
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.gguf.gguf_backend import GgufBackend


class Collect:
    def __init__(self):
        self.text = []

    def cancelled(self):
        return False

    def emit(self, item):
        self.text.append(item.text)


AMX = describe_cpu().has_amx


@pytest.mark.cpu_path
@pytest.mark.parametrize("repack", [
    pytest.param(True, id="repack-on", marks=pytest.mark.skipif(
        AMX, reason="this CPU has AMX: llama.cpp's AMX repacking crashes at decode (#20824)")),
    pytest.param(False, id="repack-off-as-on-amx"),
])
def test_model_generates_with_and_without_weight_repacking(state_dir, repack):
    bundle = read_bundle(state_dir / "models" / CHAT / "current")
    backend = GgufBackend(bundle, MachineSettings(cpu=describe_cpu(), cpu_repack=repack))
    try:
        assert backend._llm.model_params.use_extra_bufts is repack
        assert any(("repacking on" if repack else "repacking off") in r for r in backend.placement.reasons)
        out = Collect()
        result = backend.generate(GenerationRequest(prompt="The sky is", max_tokens=8, temperature=0), out)
        assert result.completion_tokens == 8 and "".join(out.text)
    finally:
        backend.close()


@pytest.mark.cpu_path
def test_the_agent_picks_and_logs_the_safe_path_for_this_cpu(state_dir, caplog):
    bundle = read_bundle(state_dir / "models" / CHAT / "current")
    with caplog.at_level("INFO", logger="runtime.gguf.gguf_backend"):
        backend = GgufBackend(bundle, MachineSettings(cpu=describe_cpu()))
    try:
        assert backend._llm.model_params.use_extra_bufts is (not AMX)
        expected = "weight repacking off (llama.cpp AMX path" if AMX else "CPU: weight repacking on"
        assert expected in caplog.text
        result = backend.generate(GenerationRequest(prompt="Hello", max_tokens=4, temperature=0), Collect())
        assert result.completion_tokens == 4
    finally:
        backend.close()
