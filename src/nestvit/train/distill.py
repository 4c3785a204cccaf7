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
from ..layers import ModelBase, to_2tuple
from ..registry import register_model


@dataclass(frozen=True)
class ConvNetConfig:
    img_size: int | tuple[int, int] = 32  # any size; the head pools globally
    in_chans: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; every stage after the first halves H, W
    drop_rate: float = 0.0  # dropout before the head


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
                                        nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes)
        self.feature_info = [dict(num_chs=w, reduction=2 ** i, module=f"stages.{i}")
                             for i, w in enumerate(cfg.widths)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return x, maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def no_weight_decay(self) -> set[str]:
        return set()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)


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


def classification_loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
                        teacher_logits: torch.Tensor | None = None, *, kind: str = "hard", alpha: float = 0.5,
                        tau: float = 1.0) -> torch.Tensor:
    """Soft-target cross entropy, plus the distillation term when ``teacher_logits`` are given.

    ``output``: student logits, or ``(cls_logits, dist_logits)`` for a distilled student.
    """
    cls, dist = output if isinstance(output, tuple) else (output, output)
    base = soft_target_cross_entropy(cls, targets)
    if teacher_logits is None:
        if isinstance(output, tuple):  # a distilled student without a teacher: both heads learn the labels
            return (base + soft_target_cross_entropy(dist, targets)) / 2
        return base
    return (1.0 - alpha) * base + alpha * distillation_term(dist, teacher_logits, kind=kind, tau=tau)
