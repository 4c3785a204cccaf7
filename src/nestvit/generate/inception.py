"""Inception-v3 as the FID literature uses it: the TF 2015-12-05 graph in pytorch-fid's layout.

FID, KID and IS are only comparable with published numbers when they come from this exact network:
the 2015-12-05 TensorFlow Inception-v3 (Szegedy et al. 2016) that the original FID code (TTUR) loads,
ported by pytorch-fid to ``pt_inception-2015-12-05-6726825d.pth``. It differs from torchvision's
``inception_v3`` in four places, all kept here:

- the average-pool branches of the A, C and first E blocks exclude padding from the mean
  (``count_include_pad=False``);
- the last E block pools its pool branch with a 3x3 *max* pool (stride 1) instead of an average;
- the classifier has 1008 outputs (the TF graph's label map), used for the Inception Score;
- no auxiliary classifier.

nestvit cannot download the file (and must not need torchvision); the user supplies it::

    nestvit generate train gan_nest_fashion_mnist \\
        --set feature_net=inception:/path/to/pt_inception-2015-12-05-6726825d.pth

Input: images in ``[-1, 1]``, ``(B, 1 | 3, H, W)``; grey images are repeated to RGB and every image is
resized to 299x299 bilinearly (``align_corners=False``, as pytorch-fid; resizing commutes with the affine map
from ``[0, 1]``, so resizing in ``[-1, 1]`` gives the same values). Features: the 2048-d global average pool
("pool3"); logits: the 1008-way classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "InceptionFeatures", "load_fid_inception"]

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
NUM_CLASSES = 1008
FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU; names ``conv`` / ``bn`` as in the weights file."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chans, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the valid pixels only (TF's SAME average pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg -> 1x1 (``pool_features``)."""

    def __init__(self, in_chans: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_chans, 64, 1)
        self.branch5x5_1 = ConvBN(in_chans, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_chans, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_chans, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max 3x3/2."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_chans, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_chans, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1), ``c7`` channels inside."""

    def __init__(self, in_chans: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_chans, 192, 1)
        self.branch7x7_1 = ConvBN(in_chans, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_chans, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_chans, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max 3x3/2."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_chans, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_chans, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``max_pool`` selects the last block's max-pool branch."""

    def __init__(self, in_chans: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_chans, 320, 1)
        self.branch3x3_1 = ConvBN(in_chans, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_chans, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_chans, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(s), self.branch3x3_2b(s),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pool),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. ``forward_features``: ``(B, C, H, W)`` in ``[-1, 1]`` -> ``(B, 2048)``;
    ``forward``: -> ``(B, 1008)`` logits. 23.85M parameters (torchvision's 27.16M less the auxiliary
    classifier, with 1008 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInceptionV3 expects (B, 1 or 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class InceptionFeatures:
    """A ``FeatureExtractor`` (see :mod:`nestvit.generate.metrics`) over :class:`FIDInceptionV3`."""

    def __init__(self, net: FIDInceptionV3, name: str, *, batch_size: int = 50) -> None:
        self.net, self.name, self.batch_size = net.eval(), name, batch_size

    def to(self, device: torch.device | str) -> InceptionFeatures:
        self.net.to(device)
        return self

    @torch.no_grad()
    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, 2048), logits (B, 1008))`` on the CPU, computed on the network's device."""
        device = next(self.net.parameters()).device
        fs, ls = [], []
        for b in images.split(self.batch_size):
            f = self.net.forward_features(b.to(device))
            fs.append(f.float().cpu())
            ls.append(self.net.fc(f).float().cpu())
        return torch.cat(fs), torch.cat(ls)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.both(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.both(images)[1]


def load_fid_inception(path: str | Path, *, batch_size: int = 50) -> InceptionFeatures:
    """Load the user's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict; read with
    ``torch.load(weights_only=True)``, never unpickling code) and wrap it as a feature extractor.

    Raises ``FeatureNetError`` naming the file and the problem when it is missing, unreadable or holds
    another network's weights.
    """
    from .metrics import FeatureNetError, sha8

    path = Path(path)
    if not path.is_file():
        raise FeatureNetError(
            f"{path}: no such file. Inception-v3 FID features need pytorch-fid's {WEIGHTS_FILE} (~92 MB, from "
            "github.com/mseitzer/pytorch-fid releases); download it on a machine with internet and pass its path "
            "as inception:PATH")
    from ..interop import WeightsError, read_state_dict

    try:  # the one weights reader: torch.save (weights_only) or safetensors, a nested "state_dict" unwrapped
        sd = read_state_dict(path)[0]
    except WeightsError as e:
        raise FeatureNetError(f"{e}; expected {WEIGHTS_FILE}") from None
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    net = FIDInceptionV3()
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != tuple(want[k]))
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        problems = [f"{name}: {few(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise FeatureNetError(f"{path} is not the FID Inception-v3 ({WEIGHTS_FILE}): " + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
    return InceptionFeatures(net, f"inception_v3_fid:{sha8(path)}", batch_size=batch_size)
