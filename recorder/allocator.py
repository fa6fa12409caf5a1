"""glibc's heap thresholds, pinned where its own adaptive rule ends up, while recording.

glibc returns the top of its heap to the kernel whenever more than M_TRIM_THRESHOLD of it is
free, and the next allocation that needs it faults its pages in again. Its adaptive rule sets
that threshold to twice the largest freed mmapped block, which keeps a plain training loop
steady (no page faults after the first steps). With a recorder attached it no longer does:
on the GPT of benchmarks/harness.py, training's own forward and backward took ~3,000–4,800
minor faults and 20–30 ms of system time per recorded step, against none without the recorder
(2026-12-01; aggregate-only recording too, and with no file written at all, so the writer's
I/O is not the cause). The likely mechanism: the recorder keeps small tensors alive from one
step to the next (norms, fingerprints, the rows of the step being committed), allocated
mid-backward at the top of the heap; when they go, the activations freed below them merge with
the top, which is then over the threshold, and glibc returns several MiB every step.

Pinning the thresholds at the values the adaptive rule itself reaches on large models
(M_MMAP_THRESHOLD at its 32 MiB ceiling, M_TRIM_THRESHOLD at twice that) ends it: ~0 faults
per steady step, system time halved (the GPT's recorded step with Project(1024, kron): a median
1.53x the plain one against 1.64x unpinned, three alternated runs each, within the VM's noise).
The cost is memory: blocks under 32 MiB then always come from the heap, and the heap is only
trimmed when more than 64 MiB at its top is free, so freed memory below live allocations stays
with the process (a reviewer's pattern of 48 freed 8 MiB tensors each followed by a small live
one kept 105 MiB pinned against 2 MiB in a fresh unpinned process; a process whose adaptive
thresholds had already risen kept 96 MiB unpinned). The setting lasts for the process, after
close() too, and forked workers (DataLoader's) inherit it. Done once per process, on glibc only,
and not where the user tuned malloc (MALLOC_*_ variables, glibc.malloc tunables in
GLIBC_TUNABLES) or set ATTRIB_TUNE_MALLOC=0. The return value says whether glibc accepted the
settings; under a preloaded allocator (jemalloc, tcmalloc) it does not mean anything changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # as glibc's adaptive rule sets it
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_")
OPT_OUT = "ATTRIB_TUNE_MALLOC"

_done = False


def pin_heap_thresholds() -> bool:
    """Pin glibc's mmap and trim thresholds (see the module docstring); returns whether glibc
    accepted them. Safe to call repeatedly and on any platform."""
    global _done
    if _done:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "0"
            or any(name in os.environ for name in USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl's mallopt does nothing)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either one freezes glibc's adaptive rule, and the trim
    # threshold alone would leave the mmap threshold at its 128 KiB start
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
