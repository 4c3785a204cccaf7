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

``machine_info(device)`` / ``machine_label(info)``: which machine a benchmark or a training run ran on. VMs sold
under one name ("AMD EPYC", 2 cores) have differed by 2-4x in bf16 training speed (docs/benchmarks.md), so
every ``nestvit bench --json`` file and every run's ``summary.json`` records the CPU family and model number,
and the flags that decide bf16 speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

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


def use_tf32(device: object, enabled: bool) -> None:
    """On a CUDA ``device``: float32 matrix products and convolutions on TF32 tensor cores (Ampere and newer; 10-bit
    mantissa inputs, float32 accumulation), as timm's training script sets, or full float32 with ``enabled=False``.
    Nothing on a CPU. A process-wide switch of PyTorch's (``torch.backends.cuda.matmul`` / ``cudnn``)."""
    if str(device).split(":")[0] != "cuda":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


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


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, the ISA flags that decide bf16 speed, PyTorch threads, load average (and the GPU)."""
    import torch

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        "cpu_family": cpu.get("cpu family"), "cpu_model_number": cpu.get("model"),
        "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
        "cpu_flags": {f: f in flags for f in wanted},
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if str(device).split(":")[0] == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info


def machine_label(info: dict[str, Any] | None) -> str | None:
    """A line for tables and logs: ``"AMD EPYC (family 26, model 2), 2 CPUs"`` or the GPU's name; None without info."""
    if not info:
        return None
    if info.get("gpu"):
        return str(info["gpu"]["name"])
    ids = ", ".join(f"{k} {info[key]}" for k, key in (("family", "cpu_family"), ("model", "cpu_model_number"))
                    if info.get(key) is not None)
    return f"{info.get('cpu_model', 'unknown')}{f' ({ids})' if ids else ''}, {info.get('usable_cpus')} CPUs"
