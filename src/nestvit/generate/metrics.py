"""Sample-quality metrics: FID, KID and Inception Score from a pluggable feature network.

Every number depends on the feature network, so every result carries its name
(:attr:`FeatureExtractor.name`, e.g. ``fmnist_convnet:1a2b3c4d`` - the weights' SHA-256 prefix).

Feature networks:

- **Offline (default here)**: :class:`ClassifierFeatures` wraps a small conv classifier
  (:class:`FeatureNet`) trained by :func:`train_feature_net` on the same data set for about a minute;
  features are its 128-d penultimate activations (post-ReLU, like Inception's pool3), logits feed the
  Inception Score. Numbers are comparable only between runs that use the *same* weights file.
- **Inception-v3** (``pt_inception-2015-12-05``, what the FID literature uses): the architecture is in
  :mod:`nestvit.generate.inception`; the weights are not bundled and cannot be downloaded here, so the user
  passes the file (``inception:PATH``). Only these numbers are comparable with published FIDs.

Maths (float64 throughout):

- FID ``= |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2)``; the square roots come from
  ``torch.linalg.eigh`` of symmetric PSD matrices (negative round-off eigenvalues are clipped to 0), so
  no ``scipy.linalg.sqrtm`` and no complex parts.
- KID: unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets (Binkowski et al. 2018).
- IS ``= exp(E_x KL(p(y|x) || p(y)))`` averaged over ``splits`` (Salimans et al. 2016).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_model

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "FeatureNet",
    "FeatureNetError",
    "GaussianStats",
    "evaluate_generator",
    "extract",
    "frechet_distance",
    "gaussian_stats",
    "get_feature_extractor",
    "inception_score",
    "kid",
    "load_inception_features",
    "sqrtm_psd",
    "train_feature_net",
]


class FeatureNetError(RuntimeError):
    """A feature network cannot be built or loaded (missing weights file, wrong file)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a feature network.

    ``name`` identifies network *and* weights; ``features`` maps images in ``[-1, 1]``, ``(B, C, H, W)``,
    to ``(B, D)``; ``logits`` (for IS) to ``(B, K)`` class logits.
    """

    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# Maths
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GaussianStats:
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    n: int


def gaussian_stats(features: torch.Tensor) -> GaussianStats:
    """Mean and unbiased covariance (``N - 1``) in float64."""
    f = features.to(torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return GaussianStats(mu, c.T @ c / (f.shape[0] - 1), f.shape[0])


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric positive semi-definite matrix (float64, via ``eigh``)."""
    a = a.to(torch.float64)
    a = (a + a.T) / 2
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``tr sqrt(sigma1 sigma2)`` is computed as ``tr sqrt(S1^1/2 sigma2 S1^1/2)`` (the same eigenvalues, but
    a symmetric PSD matrix, so ``eigh`` applies and round-off cannot produce complex parts).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    r1 = sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    m = (m + m.T) / 2
    tr_covmean = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    a, b = gaussian_stats(f1), gaussian_stats(f2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def kid(f1: torch.Tensor, f2: torch.Tensor, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: ``(mean, std)`` of the unbiased MMD^2 (cubic kernel) over random subsets.

    ``subset_size`` is capped at the smaller set; with ``num_subsets=1`` and ``subset_size >= N`` it is the
    plain unbiased MMD^2 of the two full sets.
    """
    f1, f2 = f1.to(torch.float64), f2.to(torch.float64)
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(num_subsets):
        if m == f1.shape[0] and m == f2.shape[0]:
            x, y = f1, f2
        else:
            x = f1[torch.randperm(f1.shape[0], generator=g)[:m]]
            y = f2[torch.randperm(f2.shape[0], generator=g)[:m]]
        vals.append(_mmd2_unbiased(x, y))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False)) if len(vals) > 1 else 0.0


def inception_score(logits: torch.Tensor, *, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` of ``exp(E KL(p(y|x) || p(y)))`` over ``splits`` chunks of the samples."""
    logp = F.log_softmax(logits.to(torch.float64), dim=1)
    scores = []
    for chunk in logp.chunk(splits):
        p_y = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])  # log mean p(y|x)
        kl = (chunk.exp() * (chunk - p_y)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(scores) > 1 else 0.0


# --------------------------------------------------------------------------------------------------
# Offline feature network: a small conv classifier trained on the same data
# --------------------------------------------------------------------------------------------------

@register_model("feature_net", kind="feature-net", name="feature_net")
class FeatureNet(nn.Module):
    """conv32-BN -> pool -> conv64-BN -> pool -> conv128-BN -> global avg -> fc128 (features) -> fc(num_classes).

    Size-agnostic (global pooling); about 15 MFLOPs per 28x28 image, so it trains on Fashion-MNIST in
    a minute or two on a CPU.
    """

    family = "feature_net"

    def __init__(self, in_chans: int = 1, num_classes: int = 10, dim: int = 128) -> None:
        super().__init__()
        self.in_chans, self.num_classes, self.dim = in_chans, num_classes, dim
        self.conv1 = nn.Conv2d(in_chans, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x))).mean(dim=(2, 3))
        return F.relu(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _to_unit(images: torch.Tensor, pad_to: int = 0) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float in ``[-1, 1]``, padded with -1 (background) to ``pad_to``."""
    x = images.float() / 127.5 - 1
    if pad_to and pad_to != x.shape[-1]:
        p = pad_to - x.shape[-1]
        x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
    return x


def sha8(path: Path) -> str:
    """The first 8 hex digits of the file's SHA-256: the weights' tag in feature-network names."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


class ClassifierFeatures:
    """A :class:`FeatureExtractor` over a trained :class:`FeatureNet` (eval mode, no grad, batched)."""

    def __init__(self, net: FeatureNet, name: str, *, batch_size: int = 500) -> None:
        self.net, self.name, self.batch_size = net.eval(), name, batch_size

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.forward_features(b.float()) for b in images.split(self.batch_size)])

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(b.float()) for b in images.split(self.batch_size)])

    @torch.no_grad()
    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fs, ls = [], []
        for b in images.split(self.batch_size):
            f = self.net.forward_features(b.float())
            fs.append(f)
            ls.append(self.net.head(f))
        return torch.cat(fs), torch.cat(ls)


def train_feature_net(dataset: str = "fashion_mnist", out: str | Path = "feature_net.safetensors", *,
                      epochs: int = 2, batch_size: int = 128, lr: float = 2e-3, pad_to: int = 0, seed: int = 0,
                      log: Callable[[str], None] | None = print) -> Path:
    """Train :class:`FeatureNet` on ``dataset``'s train split; write safetensors (with test accuracy in metadata)."""
    from ..data import load_dataset
    from ..interop import save_weights

    train = load_dataset(dataset, split="train")
    test = load_dataset(dataset, split="test")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = FeatureNet(train.images.shape[1], train.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = len(train)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    step = 0
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(n // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = _to_unit(train.images[idx], pad_to)
            if torch.rand((), generator=g) < 0.5:  # horizontal flip: the only augmentation
                x = x.flip(-1)
            loss = F.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log and step % 100 == 0:
                log(f"feature net step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(_to_unit(b, pad_to)).argmax(1) for b in test.images.split(1000)])
    acc = float((pred == test.labels).float().mean())
    if log:
        log(f"feature net: test accuracy {acc:.4f}, {time.perf_counter() - t0:.0f}s")
    from ..contract import RunContract

    contract = RunContract(model="feature_net", kwargs={"in_chans": net.in_chans, "num_classes": net.num_classes,
                                                        "dim": net.dim}, kind="feature-net",
                           info={"data": dataset, "pad_to": pad_to, "test_accuracy": round(acc, 4)})
    return save_weights(net, out, contract=contract)


def load_feature_net(path: str | Path) -> ClassifierFeatures:
    from ..contract import load

    path = Path(path)
    if not path.is_file():
        raise FeatureNetError(f"{path}: no feature network weights; train one with "
                              f"`python -m nestvit.generate.metrics train-features --out {path}`")
    loaded = load(path)
    if loaded.contract.kind != "feature-net":
        raise FeatureNetError(f"{path} is not a nestvit feature network (it holds {loaded.contract.model!r})")
    net = loaded.model
    data = loaded.contract.info.get("data", "")
    tag = {"fashion_mnist": "fmnist", "mnist5k": "mnist5k"}.get(data, data or "?")
    return ClassifierFeatures(net, f"{tag}_convnet:{sha8(path)}")


def load_inception_features(path: str | Path | None = None) -> FeatureExtractor:
    """The standard FID network from the user's pytorch-fid weights file (see :mod:`nestvit.generate.inception`)."""
    from .inception import WEIGHTS_FILE, load_fid_inception

    if not path:
        raise FeatureNetError(f"inception features need the weights file: inception:/path/to/{WEIGHTS_FILE}")
    return load_fid_inception(path)


def get_feature_extractor(spec: str, *, cache: str | Path | None = None, dataset: str = "fashion_mnist",
                          pad_to: int = 0, log: Callable[[str], None] | None = print) -> FeatureExtractor:
    """``"auto"``: load ``cache`` or train a :class:`FeatureNet` there; ``"inception[:PATH]"``; or a weights path."""
    if spec.startswith("inception"):
        return load_inception_features(spec.partition(":")[2] or None)
    if spec == "auto":
        if cache is None:
            raise FeatureNetError("feature_net='auto' needs a cache path")
        cache = Path(cache)
        if not cache.is_file():
            train_feature_net(dataset, cache, pad_to=pad_to, log=log)
        return load_feature_net(cache)
    return load_feature_net(spec)


# --------------------------------------------------------------------------------------------------
# Evaluating a generator
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(generator: nn.Module, n: int, *, batch_size: int = 250, seed: int = 0) -> torch.Tensor:
    """``n`` images in ``[-1, 1]`` from ``generator`` (eval mode) with latents from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    was = generator.training
    generator.eval()
    out = []
    try:
        for i in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - i), generator.latent_dim, generator=g)
            out.append(generator(z).float().clamp(-1, 1))
    finally:
        generator.train(was)
    return torch.cat(out)


def extract(extractor: FeatureExtractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of images in ``[-1, 1]``."""
    if hasattr(extractor, "both"):
        return extractor.both(images)  # type: ignore[attr-defined]
    return extractor.features(images), extractor.logits(images)


def evaluate_generator(generator: nn.Module, extractor: FeatureExtractor, ref_features: torch.Tensor, *,
                       n: int = 2000, seed: int = 12345, kid_subset: int = 1000, kid_subsets: int = 50,
                       ref_stats: GaussianStats | None = None) -> dict:
    """FID / KID / IS of ``n`` samples against reference features; the dict names the feature network."""
    t0 = time.perf_counter()
    images = generate(generator, n, seed=seed)
    feats, logits = extract(extractor, images)
    ref = ref_stats or gaussian_stats(ref_features)
    gen = gaussian_stats(feats)
    kid_mean, kid_std = kid(feats, ref_features, num_subsets=kid_subsets, subset_size=kid_subset)
    is_mean, is_std = inception_score(logits)
    return {"fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "kid": kid_mean, "kid_std": kid_std,
            "is": is_mean, "is_std": is_std, "n": n, "feature_net": extractor.name,
            "eval_seconds": round(time.perf_counter() - t0, 2)}


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nestvit.generate.metrics",
                                description="train the offline FID feature network")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-features", help="train a FeatureNet classifier and write safetensors")
    t.add_argument("--dataset", default="fashion_mnist")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--pad-to", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = train_feature_net(args.dataset, args.out, epochs=args.epochs, pad_to=args.pad_to, seed=args.seed)
    print(f"wrote {path} ({load_feature_net(path).name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
