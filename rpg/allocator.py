"""Keep freed memory in the process: glibc malloc tuned so that PyTorch's large CPU tensors reuse freed pages.

Why: on CPU, PyTorch allocates every tensor with the C library's malloc. glibc serves a block of more than 32 MiB
(at most; 128 KiB by default) with a fresh `mmap` and gives it back with `munmap` when freed, so each training step
of the backbone (activations of 512 images, over 100 MB each) maps new pages and faults every 4 KiB page of them
in again, hundreds of thousands of page faults per step, each a trip into the kernel (costly in a virtual
machine). With mmap off and the heap's top kept, freed blocks are reused and the pages stay mapped; the numbers
computed do not change (the same operations on the same values), but the peak resident memory grows, for some
jobs severalfold (the heap keeps what it had at its largest, and a freed block can be a little too small for the
next request, so the heap grows past it). `benchmarks/bench_allocator.py` measures time and memory per stage of the
default profile (docs/benchmarks.md); where memory is tight, the config's `keep_freed_memory: false`.

`keep_freed_memory(cfg.keep_freed_memory)` is called once per process by the workflow's jobs
(`rpg.experiments.rules.run_rule`) and by the torchrun entry point (`rpg.experiments.task_zoo.pipeline`); elsewhere
(not glibc: macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters of glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# the heap's free top is returned to the system only above this (C int: at most 2 GiB - 1)
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory(enabled: bool = True) -> bool:
    """Tune glibc malloc for this process: no mmap-served blocks, the heap's free top kept up to 2 GiB. Returns
    whether it applied (False when not `enabled`, the config's `keep_freed_memory`, or where the C library is not
    glibc). Affects allocations made after the call."""
    if not enabled or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
