"""Write the /proc/cpuinfo an arm64 kernel would show for the CPU qemu-user emulates.

qemu-user (7.2, Debian bookworm) passes the host's /proc/cpuinfo through, so under
emulation an arm64 program reads x86 flags ("avx2") and `edgefleet doctor` would compare
llama.cpp's ARM features against them. The emulated CPU's features are what qemu hands
the program as AT_HWCAP / AT_HWCAP2 (what llama.cpp itself uses to pick its CPU
variant); this prints them the way Linux's arch/arm64/kernel/cpuinfo.c names them, and
packaging/smoke-arm64.sh bind-mounts the result over the root's /proc/cpuinfo.
Runs inside the arm64 root, under qemu: `python3.11 arm64_cpuinfo.py > cpuinfo`.
"""

from __future__ import annotations

import ctypes
import os

# Bit n of AT_HWCAP / AT_HWCAP2 is the n-th name (Linux uapi asm/hwcap.h, arm64).
HWCAP = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
         "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
         "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
HWCAP2 = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
          "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres",
          "mte3", "sme")
AT_HWCAP, AT_HWCAP2 = 16, 26


def features() -> list[str]:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    names = []
    for key, table in ((AT_HWCAP, HWCAP), (AT_HWCAP2, HWCAP2)):
        bits = getauxval(key)
        names += [name for bit, name in enumerate(table) if bits >> bit & 1]
    return names


def main() -> None:
    line = " ".join(features())
    for cpu in range(os.cpu_count() or 1):
        print(f"processor\t: {cpu}\nFeatures\t: {line}\nCPU architecture: 8\n")


if __name__ == "__main__":
    main()
