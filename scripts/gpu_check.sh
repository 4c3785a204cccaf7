#!/usr/bin/env bash
# The GPU check (issue #38, item 7): everything nestvit should show on a CUDA machine, in one command.
#
#   bash scripts/gpu_check.sh [--require-gpu] [--dry-run]
#
# Estimated 9-12 minutes on one H100, most of it torch.compile; no GPU has run it yet.
#
# 1. the device: nvidia-smi -L, torch.cuda.get_device_name, torch and CUDA versions       -> device.txt
# 2. the generic model tests on the GPU (NESTVIT_TEST_DEVICE=cuda): forward + backward of every registered
#    model, and torch.compile against eager for one model per family                      -> tests.log
# 3. the benchmark table, `nestvit bench --device cuda`, inference and training with peak memory:
#    nest_tiny_cifar (the paper's NesT-T at 32x32) and rtnt_nano at batch $BATCH_32; nest_tiny_224,
#    tnt_s_patch16_224 and deit_small_patch16_224 at batch $BATCH_224; fp32 eager, bf16 eager and compiled
#    (--no-data: bench times augmentation on the CPU, nestvit train runs it on the GPU)   -> bench_*.json/.md
# 4. fp16 autocast rows for the same models (eager; `nestvit bench` has no fp16: the training step uses a
#    GradScaler, as `nestvit train --set precision=fp16` does)                            -> bench_fp16.json/.md
# 5. timm's NesT-T beside nestvit's at the same batch, if timm imports (skipped otherwise) -> timm.json/.md
# 6. a short training of mnist5k_nest: fp16 + torch.compile under torchrun with 1 process, and with one
#    process per GPU (DDP over NCCL) when there are several                               -> train_*/, train_*.log
# 7. a short GAN on the GPU: the FID feature network (`nestvit train fid_features`, 1 epoch) and 200 steps of
#    gan_nest_fashion_mnist with FID/KID/IS at steps 0, 100 and 200                       -> gan/, gan.log
# and summary.md: the steps with their status and time, the tables, the training results.
#
# OUT (default runs/gpu_check) is where it writes; BATCH_32 (default 256), BATCH_224 (64), ITERS (20) and
# WARMUP (5) size the benchmark. A failed step does not stop the others; the exit status is 1 if any
# required step failed. Without CUDA it prints "no CUDA device: nothing to check" and exits 0, or 1 with
# --require-gpu. --dry-run prints the commands without running them (on any machine).
set -euo pipefail
cd "$(dirname "$0")/.."

require_gpu=0
dry_run=0
for arg in "$@"; do
    case "$arg" in
        --require-gpu) require_gpu=1 ;;
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --require-gpu, --dry-run, --help)" >&2; exit 2 ;;
    esac
done

PY=${NESTVIT_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
OUT=${OUT:-runs/gpu_check}
BATCH_32=${BATCH_32:-256}
BATCH_224=${BATCH_224:-64}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-5}

if [ "$dry_run" = 0 ]; then
    if ! has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))"); then
        echo "gpu_check.sh: $PY cannot import torch (run scripts/setup.sh first)" >&2
        exit 1
    fi
    if [ "$has_cuda" != 1 ]; then
        echo "no CUDA device: nothing to check"
        exit "$require_gpu"
    fi
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    mkdir -p "$OUT"
    : > "$OUT/commands.txt"
else
    NGPU=${NGPU:-1}
fi

steps=()      # "name|status|seconds|log" for summary.md
failed=0
start_all=$SECONDS

# x CMD...: run CMD (print it instead with --dry-run); every command run is listed in commands.txt
x() {
    if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
    { printf '%q ' "$@"; echo; } >> "$OUT/commands.txt"
    "$@"
}

# step NAME LOG required|optional CMD...: run CMD (a command, or a function of this script that runs its
# commands through x) with its output in LOG; a failure is recorded, not fatal
step() {
    local name=$1 log=$2 need=$3 t0=$SECONDS rc=0
    shift 3
    declare -F "$1" > /dev/null || set -- x "$@"
    if [ "$dry_run" = 1 ]; then "$@"; return 0; fi
    echo "== $name (log: $log)"
    "$@" > "$log" 2>&1 || rc=$?
    local status="ok"
    if [ "$rc" != 0 ]; then
        status="FAILED (exit $rc)"
        [ "$need" = required ] && failed=1 || status="$status, optional"
        tail -n 5 "$log" | sed 's/^/   | /'
    fi
    echo "   $status in $((SECONDS - t0)) s"
    steps+=("$name|$status|$((SECONDS - t0))|$(basename "$log")")
}

NV=("$PY" -m nestvit)
BENCH_COMMON=(--device cuda --mode both --warmup "$WARMUP" --iters "$ITERS" --no-data --markdown)
SMALL=(nest_tiny_cifar rtnt_nano)
LARGE=(nest_tiny_224 tnt_s_patch16_224 deit_small_patch16_224)

# 1. the device
device_info() {
    if command -v nvidia-smi > /dev/null; then x nvidia-smi -L; x nvidia-smi; else echo "nvidia-smi: not found"; fi
    x "$PY" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {torch.cuda.get_device_name(i)}, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
PY
}
step "device" "$OUT/device.txt" required device_info
[ "$dry_run" = 0 ] && sed -n '/^torch /,$p' "$OUT/device.txt"

# 2. the generic model tests on the GPU
step "model tests on cuda" "$OUT/tests.log" required env NESTVIT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_models.py -k "forward_backward or compile_matches_eager"

# 3. the benchmark table (fp32 eager; bf16 eager and compiled)
bench() {  # bench TAG BATCH DTYPE-ARGS... -- MODELS...: one `nestvit bench` call, its table in TAG.md
    local tag=$1 batch=$2
    shift 2
    if [ "$dry_run" = 1 ]; then x "${NV[@]}" bench "$@" "${BENCH_COMMON[@]}" --batch "$batch" --json "$OUT/$tag.json"; return; fi
    x "${NV[@]}" bench "$@" "${BENCH_COMMON[@]}" --batch "$batch" --json "$OUT/$tag.json" > "$OUT/$tag.md"
}
step "bench 32x32 fp32" "$OUT/bench_32_fp32.log" required bench bench_32_fp32 "$BATCH_32" "${SMALL[@]}" --dtype fp32
step "bench 32x32 bf16 eager+compile" "$OUT/bench_32_bf16.log" required \
    bench bench_32_bf16 "$BATCH_32" "${SMALL[@]}" --dtype bf16 --compile both
step "bench 224 fp32" "$OUT/bench_224_fp32.log" required bench bench_224_fp32 "$BATCH_224" "${LARGE[@]}" --dtype fp32
step "bench 224 bf16 eager+compile" "$OUT/bench_224_bf16.log" required \
    bench bench_224_bf16 "$BATCH_224" "${LARGE[@]}" --dtype bf16 --compile both

# 4. fp16 autocast rows (eager), timed with nestvit.bench's own helpers
step "bench fp16 eager" "$OUT/bench_fp16.log" required "$PY" - "$OUT/bench_fp16.json" cuda "$WARMUP" "$ITERS" \
    "${SMALL[@]/%/:$BATCH_32}" "${LARGE[@]/%/:$BATCH_224}" <<'PY'
"""fp16 rows in nestvit bench's format: autocast fp16; training = zero_grad, forward, loss, scaled backward, step."""
import json
import statistics
import sys

import torch

from nestvit import create_model
from nestvit.bench import (_loss, compute_mfu, format_table, measure_peak_flops, measure_peak_memory, time_steps,
                           versions)
from nestvit.flops import count_flops
from nestvit.system import machine_info
from nestvit.train.optim import adamw


def fp16_row(name: str, batch: int, dev: torch.device, peak: float, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name).to(dev)
    h, w = model.img_size
    flops = count_flops(model, (1, model.in_chans, h, w))
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, model.in_chans, h, w, device=dev, generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), device=dev, generator=g)
    opt = adamw(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(dev.type)
    row = {"model": name, "overrides": {}, "img_size": [h, w], "batch": batch, "dtype": "fp16", "compile": False,
           "device": str(dev), "params": sum(p.numel() for p in model.parameters()), "gflops_per_image": flops / 1e9,
           "peak_tflops": peak / 1e12}

    def infer() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16):
            model(x)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16):
            loss = _loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for mode, fn in (("infer", infer), ("train", train)):
        model.train(mode == "train")
        fn()
        med = statistics.median(time_steps(fn, dev, warmup, iters))
        mem, method = measure_peak_memory(fn, dev)
        row.update({f"{mode}_images_per_s": batch / med, f"{mode}_ms_per_step": 1e3 * med,
                    f"{mode}_mfu": compute_mfu(flops, batch / med, peak, mode=mode), f"{mode}_peak_mem_bytes": mem,
                    f"{mode}_mem_per_image_mb": None if mem is None else mem / batch / 2**20, "memory_method": method})
    return row


out, device, warmup, iters, *specs = sys.argv[1:]
dev = torch.device(device)
peak = measure_peak_flops(dev, torch.float16)
rows = [fp16_row(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1]), dev, peak, int(warmup), int(iters))
        for spec in specs]
table = format_table(rows, markdown=True)
print(table)
with open(out.removesuffix(".json") + ".md", "w") as f:
    f.write(table + "\n")
settings = {"dtype": "fp16", "warmup": int(warmup), "iters": int(iters), "specs": specs,
            "note": "eager; training with a GradScaler"}
with open(out, "w") as f:
    json.dump({"machine": machine_info(device), "versions": versions(), "settings": settings, "results": rows}, f,
              indent=2, default=str)
PY

# 5. timm's NesT-T beside nestvit's (optional: never fails the check)
step "timm side by side" "$OUT/timm.log" optional "$PY" - "$OUT/timm.json" cuda "$WARMUP" "$ITERS" "$BATCH_32" \
    "$BATCH_224" <<'PY'
"""timm's NesT-T (the CIFAR configuration built from timm's Nest class, and nest_tiny at 224) beside nestvit's,
through the same nestvit.bench.bench_model; fp32 and bf16 eager. Skipped when timm does not import."""
import json
import sys

import torch

out, device, warmup, iters, b32, b224 = sys.argv[1:]
try:
    import timm
    from timm.models.nest import Nest
except Exception as e:  # noqa: BLE001 -- any import failure means: no comparison
    print(f"timm does not import ({type(e).__name__}: {e}): skipped")
    sys.exit(0)
from nestvit.bench import bench_model, format_table


def timm_model(build, size):
    m = build()
    m.img_size, m.in_chans = (size, size), 3  # what bench_model reads
    return m


cifar = dict(img_size=32, in_chans=3, patch_size=1, num_levels=4, embed_dims=(192,) * 4, num_heads=(3,) * 4,
             depths=(3,) * 4, num_classes=10)
pairs = [("nest_tiny_cifar", {"attn": "mha"}, f"timm Nest (NesT-T CIFAR config, {timm.__version__})",
          lambda: Nest(**cifar), 32, int(b32)),
         ("nest_tiny_224", {}, f"timm nest_tiny ({timm.__version__})", lambda: timm.create_model("nest_tiny"), 224,
          int(b224))]
common = dict(device=device, warmup=int(warmup), iters=int(iters))
rows = []
for name, overrides, label, build, size, batch in pairs:
    for dtype in ("fp32", "bf16"):
        rows.append(bench_model(name, overrides, batch=batch, dtype=dtype, **common))
        try:
            rows.append(bench_model(label, {}, model=timm_model(build, size), batch=batch, dtype=dtype, **common))
        except Exception as e:  # noqa: BLE001 -- a timm version without this model or option
            print(f"{label} {dtype}: skipped ({type(e).__name__}: {e})")
table = format_table(rows, markdown=True)
print(table)
with open(out.removesuffix(".json") + ".md", "w") as f:
    f.write(table + "\n")
with open(out, "w") as f:
    json.dump({"timm": timm.__version__, "torch": torch.__version__, "results": rows}, f, indent=2, default=str)
PY

# 6. a short training: fp16 + torch.compile (+ DDP over NCCL with several GPUs) under torchrun
TRAIN_SETS=(--set precision=fp16 --set compile=true --set epochs=2 --set data.limit_train=2048
            --set data.limit_eval=512 --set optim.clip_grad=1.0 --set ema.decay=0.99 --set progress=false)
train_run() {  # train_run NPROC: one torchrun launch of nestvit train into $OUT/train_${NPROC}gpu
    local n=$1
    [ "$dry_run" = 1 ] || rm -rf "$OUT/train_${n}gpu"
    x "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" -m nestvit.cli train mnist5k_nest \
        --device cuda "${TRAIN_SETS[@]}" --set global_batch=$((128 * n)) --out "$OUT/train_${n}gpu"
}
step "train fp16+compile, torchrun 1 process" "$OUT/train_1gpu.log" required train_run 1
if [ "$NGPU" -gt 1 ]; then
    step "train fp16+compile, torchrun $NGPU processes (DDP)" "$OUT/train_${NGPU}gpu.log" required train_run "$NGPU"
fi

# 7. a short GAN on the GPU (the feature network, then the NesT generator recipe with two evaluations)
gan_run() {
    [ "$dry_run" = 1 ] || rm -rf "$OUT/gan" "$OUT/fid_features"
    x "$PY" -m nestvit.cli train fid_features --device cuda --set epochs=1 --set progress=false \
        --out "$OUT/fid_features"
    x "$PY" -m nestvit.cli generate train gan_nest_fashion_mnist --device cuda --out "$OUT/gan" --set steps=200 \
        --set eval_every=100 --set eval_n=1000 --set sample_every=100 --set ckpt_every=100 --set progress=false \
        --set threads=0 --set "feature_net=$OUT/fid_features"
}
step "GAN on cuda (feature net + 200 steps)" "$OUT/gan.log" required gan_run

[ "$dry_run" = 1 ] && exit 0

# summary.md: what ran, the tables, the training results
if "$PY" - "$OUT" "$((SECONDS - start_all))" "${steps[@]}" <<'PY'
import json
import re
import sys
import time
from pathlib import Path

from nestvit.bench import format_table

out, wall, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
lines = ["# GPU check", "", f"`bash scripts/gpu_check.sh`, {time.strftime('%Y-%m-%d %H:%M')}, {wall // 60} min "
         f"{wall % 60} s in all. Device:", "", "```"]
device = (out / "device.txt").read_text().splitlines() if (out / "device.txt").is_file() else []
lines += [re.sub(r" \(UUID: [^)]*\)", "", d) for d in device if d.startswith(("GPU ", "torch ", "cuda:"))] + ["```", "",
          "| step | status | seconds | log |", "|---|---|---:|---|"]
lines += ["| " + " | ".join(s.split("|")) + " |" for s in steps]
rows = []
for name in ("bench_32_fp32", "bench_32_bf16", "bench_fp16", "bench_224_fp32", "bench_224_bf16"):
    f = out / f"{name}.json"
    if f.is_file():
        rows += json.loads(f.read_text())["results"]
if rows:
    lines += ["", "## Benchmark (`nestvit bench --device cuda`)", "",
              "Inference and training images/s, MFU against the same run's GEMM peak (fp32 without TF32), peak "
              "memory per image (`torch.cuda.max_memory_allocated`). fp16 rows: eager, training with a GradScaler.",
              "", format_table(rows, markdown=True)]
    ref = [r for r in rows if r["model"] == "nest_tiny_cifar" and r.get("infer_images_per_s")]
    if ref:
        lines += ["", "The NesT paper reports 1,616.9 images/s inference for NesT-T at 32x32 on one V100; here "
                  + ", ".join(f"{r['dtype']} {'compiled' if r['compile'] else 'eager'} {r['infer_images_per_s']:,.1f}"
                              for r in ref) + f" (batch {ref[0]['batch']}; another GPU, so a reference, not a target)."]
f = out / "timm.json"
if f.is_file():
    lines += ["", "## Beside timm (same `bench_model`, eager)", "",
              format_table(json.loads(f.read_text())["results"], markdown=True)]
elif (out / "timm.log").is_file():
    lines += ["", "## Beside timm", "", ((out / "timm.log").read_text().strip().splitlines() or ["no output"])[-1]]
runs = sorted(p for p in out.glob("train_*gpu") if p.is_dir())
if runs:
    lines += ["", "## Training (`nestvit train mnist5k_nest`, fp16 + torch.compile, 2 epochs, 2,048 images)", "",
              "| run | world size | steps | test top-1 | last epoch img/s | wall s |", "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        recs = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()] \
            if (run / "metrics.jsonl").is_file() else []
        epoch = [r for r in recs if r.get("kind") == "epoch"]
        img_s = f"{epoch[-1]['img_s']:.0f}" if epoch else "-"
        top1 = f"{s['test_top1']:.2f}%" if s.get("test_top1") is not None else "-"
        lines.append(f"| {run.name} | {s.get('world_size', '-')} | {s.get('steps', '-')} | {top1} | {img_s} | "
                     f"{s.get('wall_s', '-')} |")
    lines += ["", "With one process torchrun sets WORLD_SIZE=1, so nestvit trains without DDP or NCCL; DDP runs only "
              "where there are several GPUs (one process per GPU)."]
gan = out / "gan" / "metrics.jsonl"
if gan.is_file():
    recs = [json.loads(r) for r in gan.read_text().splitlines() if r.strip()]
    lines += ["", "## GAN (`nestvit generate train gan_nest_fashion_mnist --device cuda`, 200 steps)", "",
              "| step | FID | KID | IS | features |", "|---:|---:|---:|---:|---|"]
    lines += [f"| {r['step']} | {r['fid']:.2f} | {r['kid']:.4f} | {r['is']:.2f} | {r['feature_net']} |"
              for r in recs if r.get("kind") == "eval"]
    train_rows = [r for r in recs if r.get("kind") == "train"]
    if train_rows:
        lines += ["", f"{train_rows[-1]['sec_per_step'] * 1e3:.1f} ms per step at the last log line."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'summary.md'}")
PY
then :; else echo "summary.md could not be written"; failed=1; fi
echo "gpu check: $((SECONDS - start_all)) s, output in $OUT$([ "$failed" = 1 ] && echo ', SOME STEPS FAILED')"
exit "$failed"
