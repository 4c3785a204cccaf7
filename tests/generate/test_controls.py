"""The generation study's controls: TransGAN's explicit attention, the paper's noise input, and BatchNorm
statistics recomputed for the conv baseline's EMA generator."""

from __future__ import annotations

import pytest
import torch

from nestvit.generate.bench import bench_generators, format_table
from nestvit.generate.models import NestGenerator, build_generator
from nestvit.generate.train import GanConfig, recompute_bn_stats, train_gan
from nestvit.layers import attend, attention_kernel


def test_explicit_attention_is_the_same_maths_on_every_size():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 8) for _ in range(3))  # long: "auto" would take the fused kernel
    fused = attend(q, k, v)
    with attention_kernel("explicit"):
        explicit = attend(q, k, v)
    assert torch.allclose(fused, explicit, atol=1e-5)
    with pytest.raises(ValueError, match="one of"):
        with attention_kernel("flash"):
            pass


def test_bench_runs_each_kind_on_its_kernel_and_says_so():
    rows = bench_generators(["tiny"], ["nest", "transgan"], batch_size=2, train_batch_size=2, repeats=1,
                            train_repeats=1, warmup=0, attention={"transgan": "explicit"}, log=None)
    assert {r["kind"]: r["attention"] for r in rows} == {"nest": "auto", "transgan": "explicit"}
    assert "| explicit |" in format_table(rows)
    with pytest.raises(ValueError, match="kernel one of"):
        bench_generators(["tiny"], ["nest"], attention={"nest": "flash"}, log=None)


def test_the_papers_noise_input_reshapes_the_noise_into_the_top_level():
    g = build_generator("nest_tiny")
    n, d = g.cfg.block_size ** 2, g.cfg.embed_dims[0]
    paper = build_generator("nest_tiny", noise_input="reshape", latent_dim=n * d)
    assert paper.num_params() == g.num_params() - sum(p.numel() for p in g.stem.parameters())
    z = torch.randn(2, n * d)
    assert paper(z).shape == g(torch.randn(2, g.latent_dim)).shape
    top = paper.forward_blocks(z)[0]
    assert top.shape[1:] == (1, n, d) or top.shape[-2:] == (n, d)
    with pytest.raises(ValueError, match=f"set latent_dim={n * d}"):
        NestGenerator(paper.cfg, latent_dim=7)


def test_recomputed_bn_statistics_are_those_of_the_averaged_weights():
    g = build_generator("conv_tiny")
    state = torch.get_rng_state()
    assert recompute_bn_stats(g, batches=3, batch_size=5, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    norm = next(m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm.momentum == 0.1  # restored
    recomputed = norm.running_mean.clone()
    # by hand: the per-channel mean of the inputs to that BatchNorm over the same three batches
    seen = []
    hook = norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    gen = torch.Generator().manual_seed(4)
    g.train()
    with torch.no_grad():
        for _ in range(3):
            g(torch.randn(5, g.latent_dim, generator=gen))
    hook.remove()
    assert torch.allclose(recomputed, torch.stack(seen).mean(0), atol=1e-6)
    assert not recompute_bn_stats(build_generator("nest_tiny"))  # nothing to do without BatchNorm


def test_the_ema_generator_of_a_conv_run_carries_its_own_statistics(tmp_path):
    from nestvit.generate.train import load_generator

    data = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    common = dict(generator="conv_tiny", discriminator="resnet_tiny", batch_size=8, eval_every=-1, progress=False,
                  log_every=1, sample_every=1000, ckpt_every=1000, sample_n=4, steps=3, ema_beta=0.9)
    train_gan(GanConfig(**common, ema_bn="copy"), tmp_path / "copy", data=data)
    train_gan(GanConfig(**common), tmp_path / "recompute", data=data)
    raw = load_generator(tmp_path / "copy", ema=False)
    copied, own = load_generator(tmp_path / "copy"), load_generator(tmp_path / "recompute")
    key = next(k for k in raw.state_dict() if k.endswith("running_mean"))
    assert torch.equal(copied.state_dict()[key], raw.state_dict()[key])  # "copy": the raw generator's
    assert not torch.equal(own.state_dict()[key], raw.state_dict()[key])  # "recompute": its own
    expected = load_generator(tmp_path / "recompute")
    recompute_bn_stats(expected, batch_size=8, seed=0 + 3)
    assert torch.allclose(own.state_dict()[key], expected.state_dict()[key], atol=1e-6)


def test_the_cpu_clock_of_a_resumed_run_counts_from_its_start(tmp_path):
    from nestvit.generate.train import read_metrics

    data = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    cfg = GanConfig(generator="nest_tiny", discriminator="resnet_tiny", batch_size=8, eval_every=-1, progress=False,
                    log_every=1, sample_every=1000, ckpt_every=1000, sample_n=4, steps=4)
    train_gan(cfg, tmp_path, data=data, stop_at=2)
    train_gan(cfg, tmp_path, data=data, resume=True)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(a["cpu"] <= b["cpu"] and a["wall"] <= b["wall"] for a, b in zip(rows, rows[1:]))


def test_the_papers_bare_pixel_shuffle_has_no_projection():
    with torch.device("meta"):  # Table A4's 75M parameters: counted, never allocated
        g = build_generator("nest_64", deagg_proj=False)
        ours = build_generator("nest_64")
    assert all(isinstance(d.proj, torch.nn.Identity) and isinstance(d.norm, torch.nn.Identity)
               for d in g.deaggregations)
    extra = sum(p.numel() for d in ours.deaggregations for p in d.parameters())
    assert g.num_params() == ours.num_params() - extra
    small = build_generator("nest_tiny", embed_dims=(64, 16, 4), deagg_proj=False)
    assert small(torch.randn(2, small.latent_dim)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="4x narrower"):
        build_generator("nest_tiny", deagg_proj=False)  # widths 32/16/8 halve
