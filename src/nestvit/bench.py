"""``nestvit bench``: parameters, FLOPs, throughput, MFU and peak memory of registered models.

    nestvit bench nest_tiny_cifar tnt_s_patch16_224 [--set attn=mha] [--batch 64] [--dtype fp32,bf16]
                  [--compile both] [--mode both] [--threads 2] [--warmup 3] [--iters 10] [--json out.json]
                  [--grad-checkpointing]

For every model, dtype (``fp32``, or ``bf16`` autocast) and execution mode (eager, ``torch.compile``):

- **FLOPs**: forward FLOPs per image from :func:`nestvit.flops.count_flops` (multiply-add = 2; matrix
  products and convolutions only, attention included).
- **Throughput**: images/s at ``--batch``, the median over ``--iters`` timed steps after ``--warmup``
  untimed ones (the first compiled call is timed apart as ``compile_s``). Inference is a forward pass
  under ``torch.no_grad`` in eval mode; training is ``zero_grad(set_to_none) -> forward ->
  cross-entropy -> backward -> AdamW step`` (fused, as ``nestvit train``) in train mode (fp32 weights;
  bf16 is autocast).
- **MFU** (model FLOPs utilisation): achieved FLOP/s over the device's peak. Achieved is
  ``k x forward FLOPs/image x images/s`` with ``k = 1`` for inference and ``k = 3`` for training (backward
  ~ 2x forward, the usual convention; recomputation is not counted). The peak is *measured in the same
  run*, immediately before each model, as the median rate of a large square matrix product
  (``--peak-size``, default 4096, smaller where one product would take over 5 s) in the same dtype and
  thread count, so MFU says how close the model
  comes to what this machine's GEMM actually reaches, under the same load from other processes.
- **Peak memory** of one step beyond what is held before it (weights, optimizer state, inputs): on
  CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set (``VmHWM`` of
  ``/proc/self/status``) after resetting it by writing ``5`` to ``/proc/self/clear_refs`` and returning
  freed heap pages to the OS with ``malloc_trim(0)``. The CPU number therefore counts everything the
  step touches (activations kept for backward, gradients -- they are freed by ``set_to_none`` -- and
  oneDNN / autograd scratch), not only tensors; per image is that divided by the batch.
  ``--grad-checkpointing`` measures with ``model.set_grad_checkpointing(True)`` (every transformer layer
  recomputed in backward), so a run with and one without show the memory it saves and the time it costs.
- **Data pipeline**: images/s of ``nestvit.data``'s ``BatchAugment`` (crop, flip, RandAugment, erasing,
  mixup/cutmix) on random uint8 images of the model's size, or with ``--data NAME`` on a real data set
  (indexing + collation, or JPEG/PNG decoding for an image folder) -- shown beside the training rate
  so one sees whether the input pipeline or the model bounds training.

Results print as a table and, with ``--json``, are written with the machine (CPU model, cores, flags
that matter for bf16, load average), versions and every setting. Timings on a shared machine are only
as good as the machine is quiet: the load average is recorded before and after for that reason.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cli_args import nonnegative_int, parse_sets, positive_int, size_arg
from .fileio import atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="registered model names (see `nestvit models`), or run directories / weights files of "
                             "trained models (their architecture, read from the run contract)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. --set attn=mha (repeatable; values parsed as YAML)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="default: cpu, also on a GPU machine (pass --device cuda)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="images per step (default: 64 up to 64x64 pixels, else 8)")
    parser.add_argument("--img-size", default=None, metavar="H[,W]", help="input size (default: the model's)")
    parser.add_argument("--dtype", default="fp32", metavar="fp32|bf16[,...]",
                        help="fp32, or bf16 autocast; a comma list runs each (default fp32)")
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                        help="torch.compile the model: --compile (only compiled), --compile both (eager and "
                             "compiled); default eager only")
    parser.add_argument("--mode", default="both", choices=("infer", "train", "both"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps before timing (default 3)")
    parser.add_argument("--iters", type=positive_int, default=10,
                        help="timed steps; the median is reported (default 10)")
    parser.add_argument("--peak-size", type=positive_int, default=4096,
                        help="matrix edge of the peak-FLOP/s GEMM (halved while one product would take over 5 s)")
    parser.add_argument("--peak-iters", type=positive_int, default=5, help="timed GEMMs for the peak (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="train with model.set_grad_checkpointing(True): every transformer layer recomputed in "
                             "backward (less memory, more time)")
    parser.add_argument("--channels-last", action="store_true",
                        help="convert the model's conv weights to channels_last first (default: as built)")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="time the data pipeline on this data set (a nestvit.data name, or an image "
                             "folder root/train/<class>/*) instead of random uint8 images")
    parser.add_argument("--no-data", action="store_true", help="skip the data-pipeline measurement")
    parser.add_argument("--generators", action="store_true",
                        help="also time the NesT, TransGAN-like and conv generators side by side "
                             "(nestvit.generate.bench) at --gen-sizes")
    parser.add_argument("--gen-sizes", type=size_arg, nargs="+", default=[32, 64], metavar="PX",
                        help="--generators: output sizes, among 28 32 64 tiny (default 32 64)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every result and setting as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--profile", type=nonnegative_int, default=0, metavar="N",
                        help="also profile two steps per mode (torch.profiler) and print the top N operators "
                             "by self time")


def parse_img_size(text: str | None) -> tuple[int, int] | None:
    """``"224" -> (224, 224)``, ``"32,64" -> (32, 64)``."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise ValueError(f"--img-size expects H or H,W (positive), got {text!r}")
    return (parts[0], parts[-1])


def default_batch(img_size: tuple[int, int]) -> int:
    """64 for CIFAR-sized input (up to 64x64 pixels), 8 for ImageNet-sized input."""
    return 64 if img_size[0] * img_size[1] <= 64 * 64 else 8


# --------------------------------------------------------------------------------------------------
# Machine, peak FLOP/s, MFU, memory (machine_info lives in nestvit.system: runs record it too)
# --------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from . import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__, "nestvit": __version__}
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:
        pass
    out["mkldnn"] = str(torch.backends.mkldnn.is_available())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                       size: int = 4096, iters: int = 5, warmup: int = 1, max_s: float = 5.0) -> float:
    """FLOP/s of ``(size x size) @ (size x size)`` in ``dtype``: the median over ``iters`` timed products.

    ``2 * size**3`` FLOPs each (multiply-add = 2). This is the "peak" MFU divides by: what this
    machine's GEMM reaches now, with the current thread count and load, not a data-sheet number.
    ``size`` is halved while one product would take more than ``max_s`` seconds at the rate of a
    512-edge probe (bf16 on a CPU without bf16 kernels runs at ~1 GFLOP/s: a 4096 product takes minutes).
    """
    device = torch.device(device)
    probe = min(size, 512)
    rate = _gemm_rate(device, dtype, probe, iters=1, warmup=1)
    while size > probe and 2.0 * size ** 3 / rate > max_s:
        size //= 2
    return rate if size == probe else _gemm_rate(device, dtype, size, iters=iters, warmup=warmup)


def _gemm_rate(device: torch.device, dtype: torch.dtype, size: int, *, iters: int, warmup: int) -> float:
    """FLOP/s of one square product of edge ``size``: the median over ``iters`` timed products."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = []
    for i in range(warmup + max(iters, 1)):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 2.0 * size ** 3 / statistics.median(times)


def compute_mfu(flops_per_image: float, images_per_s: float, peak_flops: float, *, mode: str) -> float:
    """Model FLOPs utilisation: ``k * flops_per_image * images_per_s / peak`` with k = 3 (train) or 1 (infer)."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    k = 3 if mode == "train" else 1
    return k * flops_per_image * images_per_s / peak_flops


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc) so the next RSS peak counts fresh allocations only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_memory(step: Callable[[], None], device: torch.device) -> tuple[int | None, str]:
    """Bytes one call of ``step`` needs beyond what is allocated before it, and the method used.

    CUDA: ``max_memory_allocated`` (tensors of the caching allocator). CPU: peak RSS (``VmHWM``),
    reset through ``/proc/self/clear_refs`` after ``malloc_trim``; ``None`` where /proc is missing.
    """
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None, "unavailable (no writable /proc/self/clear_refs)"
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None, "unavailable (no VmRSS/VmHWM in /proc/self/status)"
    return (peak - before) * 1024, "cpu peak RSS delta (VmHWM after clear_refs, malloc_trim)"


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------

def _loss(out: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; DeiT's distilled models return (cls, dist) logits while training: average both."""
    if isinstance(out, tuple):
        return sum(F.cross_entropy(o.float(), target) for o in out) / len(out)
    return F.cross_entropy(out.float(), target)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed ones (device-synchronised)."""
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def profile_step(step: Callable[[], None], device: torch.device, *, top: int = 15, steps: int = 2
                 ) -> list[dict[str, Any]]:
    """The ``top`` operators by self time over ``steps`` calls of ``step`` (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        _sync(device)

    def self_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": self_us(e) / 1e3 / steps, "share": self_us(e) / total,
             "calls_per_step": e.count / steps}
            for e in sorted(events, key=self_us, reverse=True)[:top]]


def format_profile(ops: list[dict[str, Any]]) -> str:
    return "\n".join(f"  {o['share']:6.1%}  {o['self_ms_per_step']:9.2f} ms  {o['calls_per_step']:6.0f} calls"
                     f"  {o['op']}" for o in ops)


def bench_model(name: str, overrides: dict[str, Any] | None = None, *, device: str = "cpu", batch: int | None = None,
                img_size: tuple[int, int] | None = None, dtype: str = "fp32", compile: bool = False,
                modes: tuple[str, ...] = ("infer", "train"), warmup: int = 3, iters: int = 10,
                peak_size: int = 4096, peak_iters: int = 5, memory: bool = True,
                peak_flops: float | None = None, model: nn.Module | None = None,
                channels_last: bool = False, profile: int = 0, grad_checkpointing: bool = False) -> dict[str, Any]:
    """Measure one model in one dtype and execution mode; returns a flat dict (see the module doc).

    ``peak_flops`` (FLOP/s) skips the GEMM measurement; ``model`` benchmarks a ready module instead of
    building ``name`` from the registry; ``profile=N`` adds the top N operators per mode
    (``infer_profile`` / ``train_profile``); ``grad_checkpointing`` turns the model's on (training recomputes
    every transformer layer in backward; inference, without autograd, is unchanged).
    """
    from . import create_model
    from .flops import count_flops
    from .train.optim import adamw

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .train.distributed import DeviceError

        raise DeviceError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    overrides = dict(overrides or {})
    if img_size is not None:
        overrides["img_size"] = img_size
    torch.manual_seed(0)
    if model is None:
        model = create_model(name, **overrides)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # conv weights in NHWC; no-op for linear layers
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    h, w = model.img_size
    batch = batch or default_batch((h, w))
    flops = count_flops(model, (1, model.in_chans, h, w))
    params = sum(p.numel() for p in model.parameters())
    if peak_flops is None:
        peak_flops = measure_peak_flops(dev, DTYPES[dtype], size=peak_size, iters=peak_iters)

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, model.in_chans, h, w, device=dev, generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), device=dev, generator=g)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    run_model = torch.compile(model) if compile else model

    row: dict[str, Any] = {"model": name, "overrides": {k: v for k, v in overrides.items()},
                           "img_size": [h, w], "batch": batch, "dtype": dtype,
                           "compile": bool(compile), "device": str(dev), "params": params,
                           "gflops_per_image": flops / 1e9, "peak_tflops": peak_flops / 1e12,
                           "threads": torch.get_num_threads(), "channels_last": channels_last,
                           "grad_checkpointing": bool(grad_checkpointing),
                           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}

    def measure(mode: str, step: Callable[[], None]) -> None:
        """Time ``step`` and add the ``{mode}_*`` columns (first call, median step, MFU, profile, memory)."""
        _sync(dev)
        t0 = time.perf_counter()
        step()  # first call: compiles when --compile (forward and backward in train); creates AdamW state
        _sync(dev)  # on CUDA the call returns before its kernels finish
        first = time.perf_counter() - t0
        times = time_steps(step, dev, warmup, iters)
        ips = batch / statistics.median(times)
        row.update({f"{mode}_images_per_s": ips, f"{mode}_ms_per_step": 1e3 * statistics.median(times),
                    f"{mode}_mfu": compute_mfu(flops, ips, peak_flops, mode=mode), f"{mode}_first_call_s": first})
        if profile:
            row[f"{mode}_profile"] = profile_step(step, dev, top=profile)
        if memory:
            mem, method = measure_peak_memory(step, dev)
            row.update({f"{mode}_peak_mem_bytes": mem,
                        f"{mode}_mem_per_image_mb": None if mem is None else mem / batch / 2**20,
                        "memory_method": method})

    if "infer" in modes:
        model.eval()

        def infer_step() -> None:
            with torch.no_grad(), autocast:
                run_model(x)

        measure("infer", infer_step)

    if "train" in modes:
        model.train()
        opt = adamw(model.parameters(), lr=1e-4, weight_decay=0.05)  # fused, as nestvit's training loop

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = _loss(run_model(x), y)
            loss.backward()
            opt.step()

        measure("train", train_step)
    return row


# --------------------------------------------------------------------------------------------------
# Data pipeline and generators
# --------------------------------------------------------------------------------------------------

def bench_data_pipeline(img_size: tuple[int, int], in_chans: int, num_classes: int, *, batch: int,
                        iters: int = 5, warmup: int = 1, data: str | None = None) -> dict[str, Any]:
    """Images/s of the training input pipeline (``nestvit.data``'s ``BatchAugment``), or a note why not."""
    try:
        from .data.augment import AugmentConfig, BatchAugment
    except ImportError as e:
        return {"images_per_s": None, "note": f"skipped: nestvit.data.augment is not importable ({e})"}
    h, w = img_size
    cfg = AugmentConfig()
    if in_chans != len(cfg.mean):
        cfg = AugmentConfig(mean=(0.5,) * in_chans, std=(0.5,) * in_chans)
    augment = BatchAugment(cfg, num_classes=max(num_classes, 2))
    g = torch.Generator().manual_seed(0)

    if data is None:
        source = f"random uint8 {in_chans}x{h}x{w} (no decoding; batches made before timing)"
        pool = [(torch.randint(0, 256, (batch, in_chans, h, w), dtype=torch.uint8, generator=g),
                 torch.randint(0, max(num_classes, 2), (batch,), generator=g)) for _ in range(min(warmup + iters, 4))]
        count = 0

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal count
            count += 1
            return pool[count % len(pool)]
    else:
        from .data import load_dataset, make_loader
        from .data.folders import load_images

        if Path(data).exists():  # any layout `nestvit train` reads: class folders, split folders, a CSV
            dataset = load_images(data, "train", holdout=0.0, size=h, channels=in_chans if in_chans == 1 else 3)
            source = f"image folder {data} (Pillow decode + resize + centre crop, 0 workers)"
        else:
            dataset = load_dataset(data, split="train")
            source = f"{data} train split (in memory: index + collate, 0 workers)"
        if len(dataset) < batch:
            raise ValueError(f"--data {data}: {len(dataset)} training images, fewer than one batch of {batch}; "
                             f"give --batch {len(dataset)} or less, or more images")
        loader = make_loader(dataset, batch_size=batch, shuffle=True, drop_last=True, seed=0)
        batches = iter(loader)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal batches
            try:
                return next(batches)
            except StopIteration:
                batches = iter(loader)
                return next(batches)

    def step() -> None:
        images, labels = next_batch()
        augment(images, labels, generator=g)

    times = time_steps(step, torch.device("cpu"), warmup, iters)
    return {"images_per_s": batch / statistics.median(times), "batch": batch, "source": source,
            "pipeline": "crop+flip+RandAugment(2, 9)+normalise+erasing+mixup/cutmix (AugmentConfig defaults)"}


def run_generators(args: argparse.Namespace) -> dict[str, Any]:
    """Time the generators (``nestvit.generate.bench.bench_generators``) with this command's settings."""
    from .generate.bench import bench_generators

    wanted = {"threads": args.threads, "warmup": args.warmup, "repeats": args.iters, "sizes": args.gen_sizes}
    kwargs = {k: v for k, v in wanted.items() if v is not None}
    return {"rows": bench_generators(**kwargs), "kwargs": kwargs}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """One line per (model, dtype, compile): params, GFLOPs, infer/train img/s, MFU, memory, data img/s;
    aligned plain text, or a GitHub Markdown table with ``markdown=True``."""
    def mfu(r: dict[str, Any], key: str) -> str:
        return "-" if r.get(key) is None else f"{100 * r[key]:.0f}%"

    header = ("model", "dtype", "exec", "batch", "params M", "GFLOPs", "infer img/s", "infer MFU",
              "train img/s", "train MFU", "train MB/img", "peak TFLOP/s", "data img/s")
    cells = []
    for r in rows:
        label = (f"{r['source']} ({r['model']})" if r.get("source") else
                 r["model"] + "".join(f" {k}={v}" for k, v in r.get("overrides", {}).items() if k != "img_size"))
        label += " grad-ckpt" if r.get("grad_checkpointing") else ""
        cells.append((label, r["dtype"], "compile" if r["compile"] else "eager", str(r["batch"]),
                      _fmt(r["params"] / 1e6, ".2f"), _fmt(r["gflops_per_image"], ".2f"),
                      _fmt(r.get("infer_images_per_s"), ".1f"), mfu(r, "infer_mfu"),
                      _fmt(r.get("train_images_per_s"), ".1f"), mfu(r, "train_mfu"),
                      _fmt(r.get("train_mem_per_image_mb"), ".1f"), _fmt(r["peak_tflops"], ".3f"),
                      _fmt(r.get("data_images_per_s"), ".0f")))
    if markdown:
        rule = "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"  # numbers right-aligned
        lines = ["| " + " | ".join(row) + " |" for row in [header, *cells]]
        return "\n".join([lines[0], rule, *lines[1:]])
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(wd) if i < 3 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(tuple("-" * wd for wd in widths))] + [line(c) for c in cells])


def run(args: argparse.Namespace) -> int:
    from .contract import HUB_PREFIX
    from .registry import list_models, model_kind
    from .system import machine_info, machine_label, slow_bf16

    known = set(list_models(kind=None))
    specs = {}  # what the table calls it -> (registered name, its keyword arguments)
    for m in args.models:
        if m in known:
            specs[m] = (m, {})
        elif Path(m).exists() or m.startswith(HUB_PREFIX):
            from .contract import read_contract
            from .models.nest_variants import legacy_nest_kwargs

            contract = read_contract(m)
            specs[m] = legacy_nest_kwargs(contract.model, contract.kwargs)  # files of older versions too
            if Path(m).suffix.lower() in (".onnx", ".pt2"):
                print(f"note: {m} is an export: bench times its architecture ({contract.model}) in PyTorch, not the "
                      "export in onnxruntime or torch.export", file=sys.stderr)
        else:
            from .errors import did_you_mean

            raise ValueError(f"unknown model {m!r}{did_you_mean(m, sorted(known))}: neither a registered name "
                             "(`nestvit models`) nor a run directory or weights file")
        if specs[m][0] not in known:  # a file of a model this version does not have
            raise ValueError(f"{m} records the model {specs[m][0]!r}, which this nestvit does not have "
                             "(`nestvit models` lists them)")
        kind = model_kind(specs[m][0])
        if kind not in ("classifier", "baseline"):  # the GAN's networks take noise or give one logit
            raise ValueError(f"{m} is a {kind}: bench times classifiers; the generators are timed by `python -m "
                             "nestvit.generate.bench --sizes 28` (or beside a classifier: --generators)")
    if args.json:  # checked now, not after the benchmark
        from .cli_args import writable_dir

        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json}: is a folder; give a file name such as "
                             f"{Path(args.json) / 'bench.json'}")
        writable_dir(Path(args.json).parent, flag="--json")
    if args.generators:  # checked now, not after the classifiers were timed
        from .generate.bench import check_sizes

        check_sizes(args.gen_sizes)
    dtypes = [d.strip() for d in str(args.dtype).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--dtype takes fp32 and/or bf16 (comma separated), got {args.dtype!r}")
    if args.threads is not None:  # --warmup, --iters and --threads: ranges checked by their parser types
        torch.set_num_threads(args.threads)
    if args.data is not None and not args.no_data:  # checked now, not after the models were timed
        from .data.datasets import DATASETS
        from .data.folders import find_layout

        if Path(args.data).exists():
            find_layout(args.data)
        elif args.data not in DATASETS:
            raise ValueError(f"--data {args.data}: neither a data set ({', '.join(DATASETS)}) nor an image folder")
        if args.mode == "infer":
            print("note: --data is read by the training input pipeline's benchmark (--mode train or both); "
                  "--mode infer times the model alone", file=sys.stderr)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    overrides = parse_sets(args.set)
    img_size = parse_img_size(args.img_size)

    machine = machine_info(args.device)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    print(f"# {machine_label(machine)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {machine['load_average']}", file=sys.stderr)
    if "bf16" in dtypes and (warning := slow_bf16(args.device, "--dtype fp32")):
        print(f"# {warning}", file=sys.stderr)

    rows, data_rates = [], {}
    for label, (name, recorded) in specs.items():
        kwargs = {**recorded, **overrides}
        for dtype in dtypes:
            for use_compile in compiles:
                print(f"# {label} {dtype} {'compile' if use_compile else 'eager'} ...", file=sys.stderr)
                row = bench_model(name, kwargs, device=args.device, batch=args.batch, img_size=img_size,
                                  dtype=dtype, compile=use_compile, modes=modes, warmup=args.warmup,
                                  iters=args.iters, peak_size=args.peak_size, peak_iters=args.peak_iters,
                                  memory=not args.no_memory, channels_last=args.channels_last,
                                  profile=args.profile, grad_checkpointing=args.grad_checkpointing)
                if not args.no_data and "train" in modes:
                    key = (tuple(row["img_size"]), row["batch"])
                    if key not in data_rates:
                        model_info = _model_io(name, kwargs, img_size)
                        data_rates[key] = bench_data_pipeline(tuple(row["img_size"]), model_info[0], model_info[1],
                                                              batch=row["batch"], data=args.data)
                    row["data_images_per_s"] = data_rates[key]["images_per_s"]
                    row["data_pipeline"] = data_rates[key]
                if label != name:
                    row["source"] = label  # a trained run's model
                rows.append(row)
                torch._dynamo.reset()  # free compiled graphs between models

    print(format_table(rows, markdown=args.markdown))
    notes = {d.get("note") for d in data_rates.values() if d.get("note")}
    for note in sorted(notes):
        print(f"data pipeline: {note}")
    for r in rows:
        for mode in modes:
            if r.get(f"{mode}_profile"):
                print(f"profile: {r['model']} {r['dtype']} {'compile' if r['compile'] else 'eager'} {mode}, "
                      "top operators by self time per step:")
                print(format_profile(r[f"{mode}_profile"]))
    if rows and rows[0].get("memory_method"):
        print(f"memory: per image, {rows[0]['memory_method']}")
    result: dict[str, Any] = {"machine": machine, "versions": versions(), "settings": settings, "results": rows}
    if args.generators:
        result["generators"] = run_generators(args)
        from .generate.bench import format_table as generator_table

        print(generator_table(result["generators"]["rows"]))
    result["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        path = atomic_write_text(args.json, json.dumps(result, indent=2, default=str))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _model_io(name: str, overrides: dict[str, Any], img_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(in_chans, num_classes)`` of a registered model, built on the meta device (no memory)."""
    from . import create_model

    with torch.device("meta"):
        m = create_model(name, **{**overrides, **({"img_size": img_size} if img_size else {})})
    return int(m.in_chans), int(m.num_classes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m nestvit.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
