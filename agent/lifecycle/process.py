"""Process-wide settings a long-running agent on a small device needs.

- Open files: the soft limit is raised to the hard one, so the connection cap
  (server.max_connections), not the descriptor limit, is what refuses clients;
  at the limit asyncio's accept loop logs an error per attempt.
- The C heap: glibc adapts its mmap threshold upward after large blocks are freed,
  so later large blocks (a 140 MB JSON answer, request bodies, numpy arrays) come
  from the heap and stay in RSS after they are freed. A fixed threshold keeps
  blocks of 256 KB and more in their own mappings, which go back to the system
  when freed. Costs a page-fault pass over each large block; no measurable change
  in bench/bench_inference.py.
- Start-up garbage: importing and wiring the app frees megabytes of short-lived
  objects in the middle of the C heap, where glibc keeps the pages. Once the agent
  is ready, `trim_heap` hands those free pages back (``malloc_trim``), about 1 MiB
  of an idle agent's RSS (docs/performance.md#idle-footprint).
"""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 * 1024


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False on other C libraries."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``); False on other
    C libraries. A few milliseconds; run it off the event loop."""
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(malloc_trim(0))
