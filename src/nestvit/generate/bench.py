"""Side-by-side generator throughput: NesT vs TransGAN-like (global attention) vs conv.

``bench_generators()`` builds the presets ``{kind}_{size}`` of :mod:`nestvit.generate.models` for every
output size and measures, in one process and *interleaved* (round-robin over the generators, so load
from other processes on a shared machine hits all of them alike):

- inference: images per second at ``batch_size`` (eval mode, ``torch.no_grad``);
- training: generator steps per second at ``train_batch_size``: forward, backward of
  ``mean(G(z)^2)`` and an Adam step (the discriminator is not included, it is the same for all).

Each figure is the median over ``repeats`` timed runs after ``warmup`` untimed ones (the best run is
reported too). FLOPs per image come from :func:`nestvit.flops.count_flops`.

    python -m nestvit.generate.bench [--sizes 32 64] [--batch-size 64] [--repeats 3] [--json out.json]
    python -m nestvit.generate.bench --attention transgan=explicit   # TransGAN's own (explicit) attention
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..fileio import atomic_write_text
from ..layers import ATTENTION_KERNELS, attention_kernel
from .models import build_generator

__all__ = ["bench_generators", "format_table"]

KINDS = ("nest", "transgan", "conv")


def _time(fn: Callable[[], None], clock: str) -> float:
    """Seconds of ``fn()`` by the wall clock or by this process's CPU time (``clock="cpu"``).

    CPU time is the fairer measure on a machine shared with other jobs when PyTorch runs one thread:
    it counts the work done, not the time spent waiting for a core.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    t0 = timer()
    fn()
    return timer() - t0


def _interleaved(calls: dict[str, Callable[[], object]], *, rounds: int, warmup: int, clock: str,
                 log: Callable[[str], None] | None, where: str, what: str) -> dict[str, list[float]]:
    """Seconds of each call, round-robin over the calls for ``warmup + rounds`` rounds; the warmup is dropped."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(warmup + rounds):
        for k, fn in calls.items():
            dt = _time(fn, clock)
            if r >= warmup:
                times[k].append(dt)
            if log:
                log(f"{where} {k:9s} {what} {r + 1}/{warmup + rounds}: {dt:.3f}s")
    return times


def preset_sizes(kinds: Sequence[str] = KINDS) -> list[str]:
    """The output sizes every one of ``kinds`` has a preset of (``nest_28``, ``conv_28``, ...)."""
    from .models import GENERATORS

    return sorted({name.rpartition("_")[2] for name in GENERATORS
                   if all(f"{k}_{name.rpartition('_')[2]}" in GENERATORS for k in kinds)})


def check_sizes(sizes: Sequence[int | str], kinds: Sequence[str] = KINDS) -> None:
    """``ValueError`` naming the sizes that have presets, before anything is timed."""
    have = preset_sizes(kinds)
    bad = [str(s) for s in sizes if str(s) not in have]
    if bad:
        raise ValueError(f"generator size(s) {', '.join(bad)}: the generators ({', '.join(kinds)}) have presets of "
                         f"sizes {', '.join(have)}")


def bench_generators(sizes: Sequence[int | str] = (32, 64), kinds: Sequence[str] = KINDS, *, batch_size: int = 64,
                     train_batch_size: int | None = None, repeats: int = 3, train_repeats: int = 2, warmup: int = 1,
                     threads: int | None = None, train: bool = True, seed: int = 0, clock: str = "wall",
                     attention: dict[str, str] | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """One dict per (size, kind): params, GFLOPs/image, images/s (inference), steps/s (training), ratios.

    ``attention`` maps a kind to its attention kernel (``nestvit.layers.attention_kernel``: ``"auto"``, the
    default, ``"sdpa"`` fused, or ``"explicit"``, the materialised ``softmax(q k^T) v`` of TransGAN's code),
    e.g. ``{"transgan": "explicit"}``; rows record it.

    ``clock="wall"`` (default) times with ``time.perf_counter``; ``clock="cpu"`` with this process's CPU
    time (use it with ``threads=1`` on a loaded machine; see :func:`_time`). Rows say which clock.

    ``ratio_*`` fields compare each generator with the NesT one of the same size (``> 1``: NesT is faster).
    """
    from ..flops import count_flops

    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    check_sizes(sizes, kinds)
    if threads:
        torch.set_num_threads(threads)
    train_batch_size = train_batch_size or batch_size
    kernels = {k: (attention or {}).get(k, "auto") for k in kinds}
    for k, mode in (attention or {}).items():
        if k not in kinds or mode not in ATTENTION_KERNELS:
            raise ValueError(f"attention {k}={mode}: the kind must be one of {list(kinds)} and the kernel one of "
                             f"{ATTENTION_KERNELS}")

    def kernel(k: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with attention_kernel(kernels[k]):
                return fn()
        return run

    rows: list[dict] = []
    for size in sizes:
        torch.manual_seed(seed)
        models = {k: build_generator(f"{k}_{size}") for k in kinds}
        info = {}
        for k, g in models.items():
            info[k] = {"size": size, "kind": k, "model": f"{k}_{size}",
                       "params": sum(p.numel() for p in g.parameters()),
                       "gflops_per_image": count_flops(g, (1, g.latent_dim)) / 1e9,
                       "batch_size": batch_size, "train_batch_size": train_batch_size,
                       "threads": torch.get_num_threads(), "clock": clock, "attention": kernels[k]}
        # inference, interleaved
        z = {k: torch.randn(batch_size, g.latent_dim) for k, g in models.items()}
        for g in models.values():
            g.eval()
        with torch.no_grad():
            times = _interleaved({k: kernel(k, lambda g=g, x=z[k]: g(x)) for k, g in models.items()}, rounds=repeats,
                                 warmup=warmup, clock=clock, log=log, where=f"{size}x{size}", what="inference run")
        for k in models:
            med = statistics.median(times[k])
            info[k].update(infer_seconds=med, images_per_s=batch_size / med,
                           images_per_s_best=batch_size / min(times[k]), infer_runs=times[k])
        # training steps, interleaved
        if train:
            opts = {k: torch.optim.Adam(g.parameters(), lr=1e-4, betas=(0.0, 0.99)) for k, g in models.items()}
            zt = {k: torch.randn(train_batch_size, g.latent_dim) for k, g in models.items()}
            for g in models.values():
                g.train()

            def step(g: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
                opt.zero_grad(set_to_none=True)
                g(x).square().mean().backward()
                opt.step()

            ttimes = _interleaved({k: kernel(k, lambda g=g, o=opts[k], x=zt[k]: step(g, o, x))
                                   for k, g in models.items()},
                                  rounds=train_repeats, warmup=warmup, clock=clock, log=log,
                                  where=f"{size}x{size}", what="train step")
            for k in models:
                med = statistics.median(ttimes[k])
                info[k].update(train_step_seconds=med, train_steps_per_s=1 / med,
                               train_steps_per_s_best=1 / min(ttimes[k]), train_runs=ttimes[k])
            del opts
        ref = info.get("nest")
        for k in models:
            if ref is not None:
                info[k]["ratio_infer_vs_nest"] = ref["images_per_s"] / info[k]["images_per_s"]
                if train:
                    info[k]["ratio_train_vs_nest"] = ref["train_steps_per_s"] / info[k]["train_steps_per_s"]
            rows.append(info[k])
        models.clear()
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`bench_generators` rows."""
    train = any("train_steps_per_s" in r for r in rows)
    unit = "s" if not rows or rows[0].get("clock", "wall") == "wall" else "CPU-s"
    head = "| size | generator | attention | params | GFLOPs/img | img/{u} (batch {b}) | NesT speed-up |".format(
        u=unit, b=rows[0]["batch_size"] if rows else "?")
    sep = "|---|---|---|---:|---:|---:|---:|"
    if train:
        head += " train steps/{u} (batch {b}) | NesT speed-up |".format(u=unit, b=rows[0]["train_batch_size"])
        sep += "---:|---:|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['size']}x{r['size']} | {r['model']} | {r.get('attention', 'auto')} | {r['params'] / 1e6:.1f}M | "
                f"{r['gflops_per_image']:.2f} | "
                f"{r['images_per_s']:.1f} | {r.get('ratio_infer_vs_nest', float('nan')):.2f}x |")
        if train:
            line += f" {r['train_steps_per_s']:.3f} | {r.get('ratio_train_vs_nest', float('nan')):.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import platform

    from ..cli_args import nonnegative_int, positive_int, size_arg

    p = argparse.ArgumentParser(prog="python -m nestvit.generate.bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=size_arg, nargs="+", default=[32, 64])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--train-batch-size", type=positive_int, default=None)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--train-repeats", type=positive_int, default=2)
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs per generator before timing")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time by the wall clock or by process CPU time (fair on a shared machine with --threads 1)")
    p.add_argument("--attention", action="append", default=[], metavar="KIND=KERNEL",
                   help="attention kernel of one kind: auto (default), sdpa (fused) or explicit (softmax(q k^T) v, "
                        "as TransGAN's code), e.g. --attention transgan=explicit; repeatable")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        attention = dict(item.split("=", 1) for item in args.attention)
    except ValueError:
        p.error(f"--attention takes KIND=KERNEL, got {args.attention}")
    try:
        check_sizes(args.sizes, args.kinds)
    except ValueError as e:
        p.error(f"--sizes: {e}")
    t0 = time.perf_counter()
    rows = bench_generators(args.sizes, args.kinds, batch_size=args.batch_size,
                            train_batch_size=args.train_batch_size, repeats=args.repeats,
                            train_repeats=args.train_repeats, warmup=args.warmup, threads=args.threads,
                            train=not args.no_train, clock=args.clock, attention=attention)
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, clock {args.clock}, wall {wall:.0f}s")
    if args.json:
        record = {"rows": rows, "wall_seconds": wall, "torch": torch.__version__}
        atomic_write_text(args.json, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
