"""Process-wide CPU settings that every ``nestvit`` command applies before it allocates tensors.

``keep_freed_memory()``: glibc returns large freed blocks to the kernel (``munmap`` above the mmap
threshold, heap trimming above the trim threshold), so every training step of a CPU model faults its
activations back in page by page: 12,000-25,000 minor page faults (47-98 MB) a step for the Fashion-MNIST
results model at batch 128, which cost it 2-14 % of its training rate on the 2-core machine of
docs/benchmarks.md. Raising
both thresholds keeps freed memory in the process for reuse, what PyTorch's CUDA caching allocator does
on GPUs and what Intel's CPU tuning guide gets by preloading jemalloc or tcmalloc. Peak memory is
unchanged; the process just does not shrink between steps. ``NESTVIT_KEEP_FREED_MEMORY=0`` turns it off.

``slow_bf16(device)``: the warning that ``train``, ``eval`` and ``bench`` print before bf16 autocast
on a CPU for which oneDNN has no bf16 kernels (x86 without AVX-512: matrix products and convolutions
then fall back to slow single-threaded code; docs/benchmarks.md measured it at 10-20x slower than fp32).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it: blocks above 32 MB are still mmapped
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GB of free heap


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where this is not glibc or it is turned off."""
    if not sys.platform.startswith("linux") or os.environ.get("NESTVIT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products and convolutions on this CPU (AVX-512 or newer, or Arm bf16)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume the best, say nothing
        return True


def resolve_precision(precision: str, device: object) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` has fast bf16 kernels (a CUDA GPU with bf16, a CPU with oneDNN bf16),
    else ``"fp32"``; any other precision is returned as it is."""
    if precision != "auto":
        return precision
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_fast_bf16() else "fp32"


def slow_bf16(device: object, fix: str) -> str | None:
    """A one-line warning for bf16 autocast on ``device`` where it is slow, naming ``fix``; None where it is fine."""
    if str(device).split(":")[0] != "cpu" or cpu_has_fast_bf16():
        return None
    return (f"warning: this CPU has no fast bf16 kernels (oneDNN needs AVX-512 for bf16; matrix products and "
            f"convolutions fall back to slow single-threaded code, 10-20x slower than fp32): use {fix}")
