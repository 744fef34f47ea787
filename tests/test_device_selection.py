"""Device and thread choices, against faked descriptions of other machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.devices import (
    CpuDescription,
    choose_llama_placement,
    choose_onnx_placement,
    describe_cpu,
    parse_cpuinfo,
)

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 7763
flags\t\t: fpu sse sse2 avx avx2 fma
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm bf16
CPU implementer\t: 0x41
"""


def cpu(text: str, arch: str, physical: int = 8, logical: int = 16) -> CpuDescription:
    return CpuDescription(arch=arch, flags=parse_cpuinfo(text, arch), physical_cores=physical, logical_cores=logical)


def test_amx_cpu_turns_weight_repacking_off_and_says_why():
    placement = choose_llama_placement(cpu(SAPPHIRE_RAPIDS, "x86_64"), gpu_offload_supported=False)
    assert placement.use_extra_bufts is False
    assert any("AMX" in r and "#20824" in r for r in placement.reasons)


def test_avx2_cpu_keeps_weight_repacking():
    placement = choose_llama_placement(cpu(EPYC, "x86_64"), gpu_offload_supported=False)
    assert placement.use_extra_bufts is True
    assert placement.n_gpu_layers == 0


def test_arm_cpu_keeps_repacking_and_reads_features():
    arm = cpu(GRAVITON, "aarch64", physical=4, logical=4)
    assert {"asimd", "i8mm", "asimddp"} <= arm.flags  # the kernel names dot product "asimddp"
    placement = choose_llama_placement(arm, gpu_offload_supported=False)
    assert placement.use_extra_bufts is True
    assert (placement.n_threads, placement.n_threads_batch) == (4, 4)


def test_operator_can_force_repacking_either_way():
    amx = cpu(SAPPHIRE_RAPIDS, "x86_64")
    assert choose_llama_placement(amx, False, allow_cpu_repack=True).use_extra_bufts is True
    assert choose_llama_placement(cpu(EPYC, "x86_64"), False, allow_cpu_repack=False).use_extra_bufts is False


def test_gpu_offload_takes_all_layers_when_llama_cpp_reports_a_gpu():
    placement = choose_llama_placement(cpu(EPYC, "x86_64"), gpu_offload_supported=True)
    assert placement.n_gpu_layers == -1


def test_configured_gpu_layers_fall_back_to_cpu_without_a_gpu():
    placement = choose_llama_placement(cpu(EPYC, "x86_64"), False, requested_gpu_layers=20)
    assert placement.n_gpu_layers == 0 and "no GPU offload" in " ".join(placement.reasons)
    assert choose_llama_placement(cpu(EPYC, "x86_64"), True, requested_gpu_layers=20).n_gpu_layers == 20


def test_decode_threads_use_physical_cores_prompt_threads_logical():
    placement = choose_llama_placement(cpu(EPYC, "x86_64", physical=8, logical=16), False)
    assert (placement.n_threads, placement.n_threads_batch) == (8, 16)
    forced = choose_llama_placement(cpu(EPYC, "x86_64"), False, requested_threads=3)
    assert (forced.n_threads, forced.n_threads_batch) == (3, 3)


@pytest.mark.parametrize(
    "available, expected",
    [
        (["CPUExecutionProvider"], ("CPUExecutionProvider",)),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ("CPUExecutionProvider",)),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
         ("CUDAExecutionProvider", "CPUExecutionProvider")),
        (["CoreMLExecutionProvider", "CPUExecutionProvider"], ("CoreMLExecutionProvider", "CPUExecutionProvider")),
        (["ROCMExecutionProvider", "CPUExecutionProvider"], ("ROCMExecutionProvider", "CPUExecutionProvider")),
    ],
)
def test_onnx_providers_follow_what_onnxruntime_reports(available, expected):
    assert choose_onnx_placement(cpu(EPYC, "x86_64"), available).providers == expected


def test_configured_onnx_provider_missing_here_falls_back_and_says_so():
    placement = choose_onnx_placement(cpu(EPYC, "x86_64"), ["CPUExecutionProvider"], ["CUDAExecutionProvider"])
    assert placement.providers == ("CPUExecutionProvider",)
    assert "CUDAExecutionProvider" in placement.reasons[0]


def test_this_machine_is_described_from_proc(tmp_path: Path):
    fake = tmp_path / "cpuinfo"
    fake.write_text(SAPPHIRE_RAPIDS)
    described = describe_cpu(fake)
    assert described.has_amx == (described.arch == "x86_64")
    assert described.logical_cores >= described.physical_cores >= 1
