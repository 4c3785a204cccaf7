"""DeiT-style knowledge distillation and a small conv-net teacher.

Paper: Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021 (arXiv:2012.12877); official code https://github.com/facebookresearch/deit
(``losses.DistillationLoss``).

The teacher is frozen and sees the same (augmented) batch as the student. If the student returns
a pair ``(cls_logits, dist_logits)`` (a ViT built with ``distilled=True``, in train mode), the class
head learns the labels and the distillation head the teacher; otherwise the single head learns
both. With ``alpha`` the weight of the teacher term:

- ``hard``: ``(1 - alpha) * CE(cls, targets) + alpha * CE(dist, argmax teacher)`` (DeiT's best);
- ``soft``: ``(1 - alpha) * CE(cls, targets) + alpha * tau**2 * KL(softmax(teacher / tau) ||
  softmax(dist / tau))``.

Deviation: DeiT's soft loss divides the summed KL by ``dist.numel()`` (batch x classes); here it
is the per-sample mean (``batchmean``), the KL divergence as defined, which does not shrink the
term as the number of classes grows. ``hard`` is unchanged.

``SmallConvNet`` (three conv-BN-ReLU stages, global average pool, linear) is a teacher that trains
in a minute on MNIST-sized data; train one with ``model.name: convnet``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import soft_target_cross_entropy
from ..layers import ModelBase, checkpoint_call, intermediate_plan, recomputing, run_layers, to_2tuple
from ..registry import register_model


@dataclass(frozen=True)
class ConvNetConfig:
    img_size: int | tuple[int, int] = 32  # any size; the head pools globally
    in_chans: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; every stage after the first halves H, W
    drop_rate: float = 0.0  # dropout before the head


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics are updated once per step under gradient checkpointing.

    When a checkpointed stage is recomputed in backward (``nestvit.layers.recomputing``), it runs the same
    operation with the batch statistics as in the forward pass, but on throwaway copies of the running
    statistics (else they would move twice per step; the recomputation must save the same tensors).
    Same parameters and buffers (state-dict keys) as ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and recomputing()):
            return super().forward(x)
        return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias, True,
                            0.0, self.eps)


@register_model("convnet", kind="baseline", name="convnet")
class SmallConvNet(ModelBase):
    """A few conv layers (conv3x3-BN-ReLU per stage, stride 2 from the second stage), average pool, linear."""

    family = "convnet"

    def __init__(self, cfg: ConvNetConfig | None = None, **overrides) -> None:
        super().__init__()
        from ..registry import build_config

        cfg = build_config(cfg or ConvNetConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans, self.num_classes = to_2tuple(cfg.img_size), cfg.in_chans, cfg.num_classes
        self.num_features = cfg.widths[-1]
        stages, prev = [], cfg.in_chans
        for i, w in enumerate(cfg.widths):
            stages.append(nn.Sequential(nn.Conv2d(prev, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                                        BatchNorm2d(w), nn.ReLU(inplace=True)))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=w, reduction=2 ** i, module=f"stages.{i}")
                             for i, w in enumerate(cfg.widths)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.stages, x, checkpoint=self.grad_checkpointing)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, stop_early: bool = False,
                              ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(features (B, C, H', W'), [intermediates])``, or only the list with ``intermediates_only``.

        An intermediate is one stage's output (conv-BN-ReLU), ``(B, widths[i], H/2**i, W/2**i)`` (rounded up;
        ``feature_info[i]``); the features are the last stage's. ``indices``: ``None`` all stages; an int ``n``
        the last ``n``; a list those (negative from the end), in stage order. ``norm``: no effect (the net has
        no final norm). ``output_fmt``: ``"NCHW"``, or ``"NLC"`` (pixels as tokens, row-major).
        ``stop_early`` (with ``intermediates_only``): skip the stages after the last one asked for.
        """
        take, stop = intermediate_plan(len(self.stages), indices, output_fmt,
                                       intermediates_only=intermediates_only, stop_early=stop_early)
        maps = []
        for i, stage in enumerate(self.stages):
            x = checkpoint_call(stage, x, enabled=self.grad_checkpointing)
            if i in take:
                maps.append(x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2))
            if i == stop:
                break
        if intermediates_only:
            return maps
        return x, maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def no_weight_decay(self) -> set[str]:
        return set()


def teacher_targets(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Teacher logits for ``images`` (no gradient; the teacher stays in eval mode)."""
    with torch.no_grad():
        out = teacher(images)
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, *, kind: str, tau: float) -> torch.Tensor:
    """The teacher term for student logits ``(B, K)`` and teacher logits ``(B, K)``."""
    if kind == "hard":
        return F.cross_entropy(student.float(), teacher.argmax(dim=1))
    log_s = F.log_softmax(student.float() / tau, dim=1)
    log_t = F.log_softmax(teacher.float() / tau, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * tau * tau


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` float32 weights ``N / (K * n_k)`` of integer ``labels`` ``(N,)``, ``K`` the classes with
    images (scikit-learn's "balanced"): their mean over the images is 1; a class without images weighs 0."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def classification_loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
                        teacher_logits: torch.Tensor | None = None, *, kind: str = "hard", alpha: float = 0.5,
                        tau: float = 1.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-target cross entropy (each class's term weighted by ``class_weights`` ``(K,)``, when given), plus the
    distillation term (not weighted) when ``teacher_logits`` are given.

    ``output``: student logits, or ``(cls_logits, dist_logits)`` for a distilled student.
    """
    cls, dist = output if isinstance(output, tuple) else (output, output)
    base = soft_target_cross_entropy(cls, targets, class_weights)
    if teacher_logits is None:
        if isinstance(output, tuple):  # a distilled student without a teacher: both heads learn the labels
            return (base + soft_target_cross_entropy(dist, targets, class_weights)) / 2
        return base
    return (1.0 - alpha) * base + alpha * distillation_term(dist, teacher_logits, kind=kind, tau=tau)
