"""Parameter groups, learning-rate schedules, EMA, SAM's weight moves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nestvit import create_model
from nestvit.train.config import OptimSection
from nestvit.train.optim import (
    LRSchedule,
    ModelEMA,
    adamw,
    build_optimizer,
    frozen_norm_stats,
    no_decay_names,
    param_groups,
    sam_perturb,
    sam_restore,
)

TINY = {"img_size": 8, "patch_size": 1, "num_levels": 2, "block_size": 4, "embed_dims": 16, "num_heads": 1,
        "depths": 1}


def test_nest_official_policy_exempts_only_position_embeddings():
    model = create_model("nest_tiny_cifar", **TINY)
    exempt = no_decay_names(model, "recipe")
    assert exempt == {"levels.0.pos_embed", "levels.1.pos_embed"} == no_decay_names(model, "pos_embed_only")
    groups = {g["group"]: g for g in param_groups(model, weight_decay=0.05, policy="recipe")}
    assert "levels.0.transformer_encoder.0.norm1.weight" in groups["decay"]["names"]  # as the official code
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05


def test_1d_and_tokens_policy():
    model = create_model("nest_tiny_cifar", **TINY)
    groups = {g["group"]: g for g in param_groups(model, weight_decay=0.05, policy="1d_and_tokens")}
    no_decay = set(groups["no_decay"]["names"])
    assert "levels.0.pos_embed" in no_decay and "head.bias" in no_decay and "norm.weight" in no_decay
    assert all(model.get_parameter(n).ndim > 1 for n in groups["decay"]["names"])
    assert "head.weight" in groups["decay"]["names"]
    # every parameter is in exactly one group
    names = groups["decay"]["names"] + groups["no_decay"]["names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_recipe_policy_for_other_families():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.fc = nn.Linear(8, 8)

        def no_weight_decay(self):
            return {"pos_embed"}

    assert no_decay_names(Net(), "recipe") == {"pos_embed", "fc.bias"}


def test_optimizer_groups_reach_adamw():
    model = create_model("nest_tiny_cifar", **TINY)
    opt = build_optimizer(model, OptimSection(weight_decay=0.1), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_adamw_is_fused_on_cpu_and_matches_the_reference_update():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    b = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    assert build_optimizer(a, OptimSection(), lr=1e-2).defaults["fused"] is True
    fused = adamw(a.parameters(), lr=1e-2, weight_decay=0.05)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    x = torch.randn(8, 5)
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_warmup_then_cosine():
    s = LRSchedule(peak=1.0, total_steps=110, warmup_steps=10, name="cosine", min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)  # (step + 1) / warmup
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert s(110) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    w = LRSchedule(peak=2.0, total_steps=10, warmup_steps=4, warmup_start=0.5)
    assert w(0) == pytest.approx(2.0 * (0.5 + 0.5 * 0.25))


def test_rtnt_step_decay():
    s = LRSchedule(peak=1e-3, total_steps=2000, name="step", step_every=200, gamma=0.96)
    assert s(0) == s(199) == pytest.approx(1e-3)
    assert s(200) == pytest.approx(0.96e-3)
    assert s(399) == pytest.approx(0.96e-3)
    assert s(1000) == pytest.approx(1e-3 * 0.96 ** 5)


def test_schedule_follows_a_time_budget_when_it_is_further_along():
    s = LRSchedule(peak=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert s(5, time_frac=0.9) == s(5)  # warmup counts steps only
    assert s(60, time_frac=0.1) == s(60)  # the step is further along
    assert s(20, time_frac=0.5) == pytest.approx(s(55)) and s(20, time_frac=0.5) < s(20)
    assert s(20, time_frac=1.0) == pytest.approx(0.1)  # at the deadline: the floor
    step = LRSchedule(peak=1.0, total_steps=1000, name="step", step_every=100, gamma=0.5)
    assert step(0, time_frac=0.25) == pytest.approx(0.25)  # 250 steps' worth of time: two decays


def test_schedule_from_config_counts_warmup_in_steps():
    from nestvit.train.config import ScheduleSection

    s = LRSchedule.from_config(ScheduleSection(warmup_epochs=2.5), peak=1.0, steps_per_epoch=10, epochs=5)
    assert (s.total_steps, s.warmup_steps) == (50, 25)


def test_ema_math():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.81 * w0 + 0.19 * (w0 + 1.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def _with_gradients(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("nest_tiny_cifar", **TINY, num_classes=4)
    model(torch.randn(3, 3, 8, 8)).logsumexp(1).sum().backward()
    return model


def test_sam_moves_the_weights_by_rho_along_the_gradient_and_back():
    model = _with_gradients()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]))
    moved = sam_perturb(model, 0.05)
    assert len(moved) == len(before) and all(p.grad is None for p in model.parameters())
    step = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for n in before:
        torch.testing.assert_close(step[n], 0.05 * grads[n] / norm, rtol=1e-3, atol=1e-6, msg=n)
    assert abs(torch.linalg.vector_norm(torch.cat([s.flatten() for s in step.values()])).item() - 0.05) < 1e-5
    sam_restore(moved)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_sam_leaves_the_weights_alone_when_the_gradient_overflows():
    model = _with_gradients()
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad[0] = float("inf")
    assert sam_perturb(model, 0.05) == []
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))


def test_frozen_norm_stats_keeps_batch_norm_statistics():
    bn = nn.BatchNorm2d(3)
    with frozen_norm_stats(bn):
        bn(torch.randn(4, 3, 5, 5) + 2)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.num_batches_tracked.item() == 0
    bn(torch.randn(4, 3, 5, 5) + 2)
    assert bn.running_mean.min() > 0.1 and bn.num_batches_tracked.item() == 1
