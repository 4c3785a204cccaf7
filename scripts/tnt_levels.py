"""Time one TNT-S block's two transformer layers apart (fwd + bwd, fp32, batch 8 at 224x224).

    .venv/bin/python scripts/tnt_levels.py

The inner layer runs on 8 x 196 patches x 16 words of width 24, the outer on 8 x 197 tokens of
width 384. Prints ms per call and the achieved share of the peak (a 4096x4096 fp32 GEMM), which is
what docs/benchmarks.md quotes for where tnt_s_patch16_224's training time goes.
"""

from __future__ import annotations

import statistics

import torch

from nestvit.bench import measure_peak_flops, time_steps
from nestvit.layers import TransformerLayer


def main() -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    peak = measure_peak_flops(cpu, torch.float32)
    print(f"peak {peak / 1e12:.3f} TFLOP/s (fp32 GEMM), {torch.get_num_threads()} threads")
    for name, dim, heads, (rows, n) in (("inner", 24, 4, (8 * 196, 16)), ("outer", 384, 6, (8, 197))):
        layer = TransformerLayer(dim, num_heads=heads, qkv_bias=False, norm_eps=1e-5)
        x = torch.randn(rows, n, dim, requires_grad=True)
        grad = torch.randn(rows, n, dim)
        def step(layer: TransformerLayer = layer, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
            layer(x).backward(grad)

        ms = 1e3 * statistics.median(time_steps(step, cpu, warmup=3, iters=10))
        tokens = rows * n
        flops = 3 * (2 * tokens * 12 * dim * dim + 4 * tokens * n * dim)  # linears + attention, fwd + bwd
        print(f"{name}: {tokens} tokens of width {dim}: {ms:.1f} ms fwd+bwd, {flops / 1e9:.2f} GFLOP, "
              f"{flops / (ms / 1e3) / peak:.0%} of peak")


if __name__ == "__main__":
    main()
