"""Make llama.cpp find the CPU backend libraries a portable build ships.

A llama.cpp built with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS (our --portable and arm64
packages) has no CPU code in libggml itself: one libggml-cpu-<variant>.so per instruction-set
level, of which it loads the best the CPU supports. It looks for them only in the running
executable's directory (/usr/bin for a venv's python) and the working directory, never beside
libggml, so llama-cpp-python as installed finds none and cannot load a model. The package
build puts them in llama_cpp/lib; this points llama.cpp there before its first use. With an
ordinary build (CPU code inside libggml, no such files) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def load_llama_backends() -> int:
    """Register the CPU variants shipped in llama_cpp/lib, once; returns llama.cpp's backend count."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if not any(lib_dir.glob("libggml-cpu-*.so")):
        return -1
    ggml = ctypes.CDLL(_loaded_libggml(lib_dir))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    if ggml.ggml_backend_reg_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
        log.info("llama.cpp CPU backends loaded from %s", lib_dir)
    return int(ggml.ggml_backend_reg_count())


def _loaded_libggml(lib_dir: Path) -> str:
    """The libggml file libllama was linked with. A wheel holds copies, not links, of
    libggml.so, .so.0 and .so.0.x; opening another copy would load a second libggml with its
    own, empty backend registry, which llama.cpp never sees."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = Path(fields[5]) if len(fields) == 6 else None
        if path is not None and path.parent == lib_dir and path.name.startswith("libggml.so"):
            return str(path)
    return str(lib_dir / "libggml.so.0")  # libllama's DT_NEEDED name
