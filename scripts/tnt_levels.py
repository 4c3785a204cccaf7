"""Time one TNT-S block's two transformer layers apart (fwd + bwd, fp32, batch 8 at 224x224).

    .venv/bin/python scripts/tnt_levels.py

The inner layer runs on 8 x 196 patches x 16 words of width 24, the outer on 8 x 197 tokens of
width 384. Prints ms per call and the achieved share of the peak (a 4096x4096 fp32 GEMM), which is
what docs/benchmarks.md quotes for where tnt_s_patch16_224's training time goes.
"""

from __future__ import annotations

import time

import torch

from nestvit.bench import measure_peak_flops
from nestvit.layers import TransformerLayer


def median_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    print(f"peak {peak / 1e12:.3f} TFLOP/s (fp32 GEMM), {torch.get_num_threads()} threads")
    for name, dim, heads, (rows, n) in (("inner", 24, 4, (8 * 196, 16)), ("outer", 384, 6, (8, 197))):
        layer = TransformerLayer(dim, num_heads=heads, qkv_bias=False, norm_eps=1e-5)
        x = torch.randn(rows, n, dim, requires_grad=True)
        grad = torch.randn(rows, n, dim)
        ms = median_ms(lambda layer=layer, x=x, grad=grad: layer(x).backward(grad))
        tokens = rows * n
        flops = 3 * (2 * tokens * 12 * dim * dim + 4 * tokens * n * dim)  # linears + attention, fwd + bwd
        print(f"{name}: {tokens} tokens of width {dim}: {ms:.1f} ms fwd+bwd, {flops / 1e9:.2f} GFLOP, "
              f"{flops / (ms / 1e3) / peak:.0%} of peak")


if __name__ == "__main__":
    main()
