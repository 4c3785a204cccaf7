"""``nestvit bench`` and the CPU fast paths it measures. Fast: tiny models, one or two iterations.

No assertion here is about speed: performance claims live in docs/benchmarks.md, never in timed tests.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nestvit
from nestvit import bench
from nestvit.cli import main
from nestvit.layers import attend
from nestvit.models.nest import set_cpu_chunk_tokens
from tests.conftest import rand_input, tiny_model

# nest_tiny_cifar shrunk through --set / --img-size, as a user would
TINY_NEST = ["nest_tiny_cifar", "--img-size", "16", "--set", "block_size=2", "--set", "embed_dims=16",
             "--set", "num_heads=2", "--set", "depths=1"]
FAST = ["--batch", "2", "--warmup", "0", "--iters", "1", "--peak-size", "64", "--peak-iters", "1"]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def test_bench_writes_json_with_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_NEST, *FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "nest_tiny_cifar" in table and "train MFU" in table
    from nestvit.system import machine_label

    assert printed.err.startswith(f"# {machine_label(json.loads(out.read_text())['machine'])}, torch ")  # the CPU's ids

    result = json.loads(out.read_text())
    assert {"machine", "versions", "settings", "results"} <= set(result)
    machine = result["machine"]
    for key in ("cpu_model", "logical_cpus", "usable_cpus", "cpu_flags", "torch_threads", "load_average"):
        assert key in machine
    assert {"avx512_bf16", "amx_bf16"} <= set(machine["cpu_flags"])
    assert result["versions"]["torch"] == torch.__version__
    settings = result["settings"]
    for key in ("models", "set", "device", "batch", "img_size", "dtype", "compile", "mode", "threads", "warmup",
                "iters", "peak_size", "data", "generators", "json"):
        assert key in settings, key

    (row,) = result["results"]
    for key in ("model", "overrides", "img_size", "batch", "dtype", "compile", "device", "params",
                "gflops_per_image", "peak_tflops", "threads",
                "infer_images_per_s", "infer_ms_per_step", "infer_mfu", "infer_first_call_s", "infer_peak_mem_bytes",
                "train_images_per_s", "train_ms_per_step", "train_mfu", "train_first_call_s", "train_peak_mem_bytes",
                "train_mem_per_image_mb", "memory_method", "data_images_per_s", "data_pipeline"):
        assert key in row, key
    assert row["img_size"] == [16, 16] and row["batch"] == 2 and row["overrides"]["depths"] == 1
    assert row["params"] == nestvit.create_model("nest_tiny_cifar", img_size=16, block_size=2, embed_dims=16,
                                                 num_heads=2, depths=1).num_params()
    assert row["gflops_per_image"] > 0 and row["peak_tflops"] > 0
    assert row["infer_images_per_s"] > 0 and row["train_images_per_s"] > 0
    assert row["train_mfu"] == pytest.approx(bench.compute_mfu(row["gflops_per_image"] * 1e9, row["train_images_per_s"],
                                                               row["peak_tflops"] * 1e12, mode="train"))


def test_profile_lists_the_top_operators(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_NEST, *FAST, "--mode", "train", "--no-memory", "--no-data", "--profile", "5",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top operators by self time" in printed
    (row,) = json.loads(out.read_text())["results"]
    ops = row["train_profile"]
    assert 1 <= len(ops) <= 5 and all(o["self_ms_per_step"] > 0 and 0 < o["share"] <= 1 for o in ops)
    assert [o["share"] for o in ops] == sorted((o["share"] for o in ops), reverse=True)
    assert any(o["op"].startswith("aten::") for o in ops) and "infer_profile" not in row


def test_markdown_table_and_channels_last(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_NEST, *FAST, "--mode", "infer", "--no-memory", "--no-data", "--markdown",
                 "--channels-last", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | dtype | exec |") and lines[0].endswith("| data img/s |")
    assert lines[1] == "|" + "|".join(["---"] * 3 + ["---:"] * 10) + "|"
    assert lines[2].startswith("| nest_tiny_cifar ") and lines[2].count("|") == 14
    (row,) = json.loads(out.read_text())["results"]
    assert row["channels_last"] is True and row["infer_images_per_s"] > 0


def test_bench_dtype_list_and_single_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)  # an AVX2-only CPU
    out = tmp_path / "b.json"
    assert main(["bench", *TINY_NEST, *FAST, "--dtype", "fp32,bf16", "--mode", "infer", "--no-memory", "--no-data",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"]
    assert all("train_mfu" not in r and r["infer_mfu"] > 0 for r in rows)
    err = capsys.readouterr().err
    assert "no fast bf16 kernels" in err and "use --dtype fp32" in err


@pytest.mark.parametrize("argv, message", [
    (["bench", "nest_huge_cifar"], "unknown model"),
    (["bench", "nest_tiny_cifar", "--dtype", "fp16"], "--dtype"),
    (["bench", "nest_tiny_cifar", "--set", "attn"], "KEY=VALUE"),
    (["bench", "nest_tiny_cifar", "--img-size", "0"], "--img-size"),
    (["bench", "generator_nest_28"], "is a generator: bench times classifiers; the generators are timed by"),
    (["bench", "nest_tiny_cifar", "--generators", "--gen-sizes", "48"],  # before the classifier is timed
     "generator size(s) 48: the generators (nest, transgan, conv) have presets of sizes 28, 32, 64"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parsers():
    assert bench.parse_sets(["attn=mha", "depths=[1, 1, 1, 1]", "act=gelu"]) == {
        "attn": "mha", "depths": (1, 1, 1, 1), "act": "gelu"}
    assert bench.parse_img_size("224") == (224, 224)
    assert bench.parse_img_size("32,64") == (32, 64)
    assert bench.parse_img_size(None) is None
    assert bench.default_batch((32, 32)) == 64 and bench.default_batch((224, 224)) == 8
    from nestvit.cli import build_parser

    args = build_parser().parse_args(["bench", "nest_tiny_cifar", "--generators", "--gen-sizes", "tiny", "32"])
    assert args.gen_sizes == ["tiny", 32]  # a preset's name, as its --help says, or pixels


# --------------------------------------------------------------------------------------------------
# MFU, peak FLOP/s, memory
# --------------------------------------------------------------------------------------------------

def test_mfu_on_known_numbers():
    # 1 GFLOP forward per image, 100 images/s, 1 TFLOP/s peak
    assert bench.compute_mfu(1e9, 100.0, 1e12, mode="infer") == pytest.approx(0.1)
    assert bench.compute_mfu(1e9, 100.0, 1e12, mode="train") == pytest.approx(0.3)  # forward + 2x backward
    with pytest.raises(ValueError, match="mode"):
        bench.compute_mfu(1e9, 100.0, 1e12, mode="both")
    with pytest.raises(ValueError, match="positive"):
        bench.compute_mfu(1e9, 100.0, 0.0, mode="train")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_flops_is_positive(dtype):
    assert bench.measure_peak_flops("cpu", dtype, size=64, iters=2) > 0


def test_peak_flops_shrinks_a_product_that_would_take_too_long(monkeypatch):
    sizes = []
    monkeypatch.setattr(bench, "_gemm_rate", lambda device, dtype, size, **k: sizes.append(size) or 1e9)  # 1 GFLOP/s
    assert bench.measure_peak_flops("cpu", size=4096, max_s=5.0) == 1e9
    assert sizes == [512, 1024]  # 4096 would take 137 s and 2048 17 s at that rate; 1024 takes 2.1 s
    sizes.clear()
    bench.measure_peak_flops("cpu", size=4096, max_s=200.0)
    assert sizes == [512, 4096]


def test_cpu_peak_memory_sees_a_64_mb_tensor():
    def step():
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        assert x.sum() > 0

    used, method = bench.measure_peak_memory(step, torch.device("cpu"))
    if used is None:
        pytest.skip(method)
    assert used >= 48 * 2**20, method


def test_versions():
    assert bench.versions()["nestvit"] == nestvit.__version__


# --------------------------------------------------------------------------------------------------
# Data pipeline and generators (optional modules)
# --------------------------------------------------------------------------------------------------

def test_data_pipeline_rate_or_note():
    rate = bench.bench_data_pipeline((16, 16), 3, 10, batch=4, iters=1, warmup=0)
    if rate["images_per_s"] is None:
        assert "skipped" in rate["note"]
    else:
        assert rate["images_per_s"] > 0 and "random uint8" in rate["source"]


def test_data_pipeline_reads_what_train_reads(tmp_path, capsys):
    # class folders without split folders, as `nestvit train` takes them (before: "flat/train is not a directory")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / "flat" / cls / f"{i}.png")
    rate = bench.bench_data_pipeline((16, 16), 3, 2, batch=4, iters=1, warmup=0, data=str(tmp_path / "flat"))
    assert rate["images_per_s"] > 0 and "image folder" in rate["source"]
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "loose" / "0.png")
    assert main(["bench", *TINY_NEST, *FAST, "--mode", "train", "--data", str(tmp_path / "loose")]) == 2
    assert "has no class folders" in capsys.readouterr().err  # before the models are timed
    assert main(["bench", *TINY_NEST, *FAST, "--mode", "infer", "--no-memory", "--data", str(tmp_path / "flat")]) == 0
    assert "--mode infer times the model alone" in capsys.readouterr().err


def test_generators_side_by_side_through_bench(capsys):
    args = types.SimpleNamespace(threads=None, warmup=0, iters=1, gen_sizes=[28])
    out = bench.run_generators(args)
    assert out["kwargs"] == {"warmup": 0, "repeats": 1, "sizes": [28]}
    kinds = {r["kind"] for r in out["rows"]}
    assert kinds == {"nest", "transgan", "conv"} and all(r["images_per_s"] > 0 for r in out["rows"])
    from nestvit.generate.bench import format_table

    assert "nest_28" in format_table(out["rows"])


# --------------------------------------------------------------------------------------------------
# The CPU fast paths compute the same function as the plain ones
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_q, shape_kv", [
    ((6, 3, 16, 8), (6, 3, 16, 8)),  # multi-head, NesT-like 16-token blocks
    ((6, 1, 48, 8), (6, 1, 16, 8)),  # multi-query: every head's queries stacked, one K/V head
    ((2, 2, 200, 8), (2, 2, 200, 8)),  # long float32 sequence: the fused kernel
])
def test_attend_matches_sdpa_values_and_gradients(shape_q, shape_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=g, requires_grad=True)
    k = torch.randn(shape_kv, generator=g, requires_grad=True)
    v = torch.randn(shape_kv, generator=g, requires_grad=True)
    grad = torch.randn(shape_q, generator=g)
    out = attend(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["mqa", "mha"])
def test_nest_groups_of_images_match_the_whole_batch(attn):
    """``set_cpu_chunk_tokens`` only regroups images: outputs and gradients are those of one whole-batch pass."""
    grouped = tiny_model("nest_tiny_cifar", attn=attn)
    whole = tiny_model("nest_tiny_cifar", attn=attn)
    whole.load_state_dict(grouped.state_dict())
    x = rand_input(grouped, batch=5)
    assert grouped.levels[0].tokens_per_image == 256 and grouped.levels[1].tokens_per_image == 64
    outs = []
    for m, tokens in ((grouped, 256), (whole, 0)):  # 256: 1 image per group at level 0; 0: the whole batch
        with set_cpu_chunk_tokens(tokens):
            outs.append(m.eval()(x))
            m.train()(x).square().mean().backward()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(grouped.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gpu_check_script_without_cuda_says_so_and_lists_its_commands():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "NESTVIT_PYTHON": sys.executable}
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "no CUDA device: nothing to check" in run.stdout
    assert subprocess.run(["bash", str(script), "--require-gpu"], capture_output=True, env=env,
                          timeout=120).returncode == 1
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0
    for expected in ("NESTVIT_TEST_DEVICE=cuda", "bench nest_tiny_cifar", "--device cuda", "precision=fp16",
                     "compile=true", "train fid_features --device cuda", "generate train gan_nest_fashion_mnist"):
        assert expected in dry.stdout, expected
