"""Sample-quality metrics: FID, KID and Inception Score from a pluggable feature network.

Every number depends on the feature network, so every result carries its name
(:attr:`FeatureExtractor.name`, e.g. ``fmnist_convnet:1a2b3c4d`` - the weights' SHA-256 prefix).

Feature networks:

- **Offline (default here)**: :class:`ClassifierFeatures` wraps a nestvit classifier run trained on the same
  data set, by default the ``fid_features`` recipe (``nestvit train fid_features``: the small conv net
  ``convnet``, a few minutes on a CPU core; :func:`train_feature_net` runs it). Features are its pre-logits
  (for the conv net the 128-d globally pooled post-ReLU activations, like Inception's pool3), logits feed the
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

import contextlib
import hashlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import InputTransform
from ..errors import UserError

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "FeatureNetError",
    "GaussianStats",
    "evaluate_generator",
    "extract",
    "frechet_distance",
    "gaussian_stats",
    "get_feature_extractor",
    "inception_score",
    "kid",
    "load_feature_net",
    "load_inception_features",
    "sqrtm_psd",
    "train_feature_net",
]


class FeatureNetError(UserError, RuntimeError):
    """A feature network cannot be built or loaded (missing weights file, wrong file)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a feature network.

    ``name`` identifies network *and* weights; ``features`` maps images in ``[-1, 1]``, ``(B, C, H, W)``,
    on any device, to ``(B, D)`` on the CPU; ``logits`` (for IS) to ``(B, K)`` class logits; ``to`` moves the
    network to the device it computes on.
    """

    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> FeatureExtractor: ...


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
# Offline feature network: a nestvit classifier run (by default the ``fid_features`` recipe's conv net)
# --------------------------------------------------------------------------------------------------

FEATURES_RECIPE = "fid_features"  # src/nestvit/recipes/fid_features.yaml


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
    """A :class:`FeatureExtractor` over a trained nestvit classifier (eval mode, no grad, batched).

    Images in ``[-1, 1]`` ``(B, C, H, W)`` are mapped to ``[0, 1]`` and normalised with the classifier's own
    ``transform`` (its run contract), so the network sees what it saw in training. Features are its pre-logits
    ``forward_head(..., pre_logits=True)`` ``(B, num_features)`` (for the conv net: the globally pooled post-ReLU
    activations, like Inception's pool3); logits, for the Inception Score, are its head's ``(B, num_classes)``.
    """

    def __init__(self, net: nn.Module, transform: InputTransform, name: str, *, batch_size: int = 500,
                 data: str | None = None) -> None:
        self.net, self.transform, self.name, self.batch_size = net.eval(), transform, name, batch_size
        self.data = data  # the data set it was trained on, where its run recorded it

    def to(self, device: torch.device | str) -> ClassifierFeatures:
        self.net.to(device)
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        t = self.transform
        if x.shape[1] != t.channels or tuple(x.shape[-2:]) != tuple(t.size):
            raise FeatureNetError(
                f"feature network {self.name} takes {t.channels}x{t.size[0]}x{t.size[1]} images, got "
                f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]}; train it on the generator's images (data.pad_to "
                "matching the GAN's pad_to) or pick a feature network of that size")
        x = x.to(next(self.net.parameters()).device).float()
        return t((x + 1) / 2)  # [0, 1], normalised as the run's contract says (the one eval transform)

    def _both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.forward_head(self.net.forward_features(self._input(x)), pre_logits=True)
        return f.float().cpu(), self.net.head(f).float().cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.both(images)[0]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.both(images)[1]

    @torch.no_grad()
    def both(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fs, ls = zip(*(self._both(b) for b in images.split(self.batch_size)))
        return torch.cat(fs), torch.cat(ls)


def train_feature_net(dataset: str = "fashion_mnist", run_dir: str | Path = "runs/fid_features", *,
                      epochs: int | None = None, pad_to: int = 0, seed: int = 0, progress: bool = False,
                      log: Callable[[str], None] | None = print) -> Path:
    """Train the ``fid_features`` recipe on ``dataset`` into ``run_dir`` (or finish it there); its weights file.

    The same as ``nestvit train fid_features --out RUN_DIR --set data.name=DATASET`` (plus ``data.pad_to``,
    ``epochs``, ``seed``): the one training loop, its run directory and run contract. The FID features are its
    ``last`` weights (not ``best``, which the test split chose).
    """
    from ..contract import resolve_weights
    from ..train import load_config, train
    from ..train.checkpoint import STATE_FILE

    run_dir = Path(run_dir)
    sets = [f"data.name={dataset}", f"seed={seed}", f"progress={str(progress).lower()}",
            *([f"data.pad_to={pad_to}"] if pad_to else []), *([f"epochs={epochs}"] if epochs else [])]
    cfg = load_config(FEATURES_RECIPE, sets)
    if not (run_dir / "summary.json").is_file():
        if log:
            log(f"training the FID feature network ({FEATURES_RECIPE}, {cfg.model.name} on {dataset}) -> {run_dir}")
        with contextlib.redirect_stdout(io.StringIO()) if log is None else contextlib.nullcontext():
            result = train(cfg, run_dir, resume=(run_dir / STATE_FILE).is_file())
        if log and result.test is not None:
            log(f"feature network: test top-1 {result.test.top1:.2f}% after {result.epochs_done} epochs")
    return resolve_weights(run_dir, "last")


def load_feature_net(path: str | Path) -> ClassifierFeatures:
    """A classifier run directory or weights file (its ``last`` weights) as a :class:`ClassifierFeatures`."""
    from ..contract import gan_run_folder, load, read_contract, resolve_weights

    path = Path(path)
    if path.is_dir() and gan_run_folder(path) is not None:
        raise FeatureNetError(f"{path} is a GAN run; FID features come from a classifier trained on the same data "
                              f"(`nestvit train {FEATURES_RECIPE} --out DIR`, then --feature-net DIR, or --set "
                              "feature_net=DIR)")
    if not path.exists():
        run = path.parent if path.suffix == ".safetensors" else path
        raise FeatureNetError(f"{path}: no feature network there; if it moved, name its new place (nestvit generate "
                              "eval RUN --feature-net PATH; a resume: --set feature_net=PATH), the same network "
                              f"for comparable FIDs; else train one with `nestvit train {FEATURES_RECIPE} --out "
                              f"{run}` (or name any classifier run)")
    try:
        weights = resolve_weights(path, "last") if path.is_dir() else path
        contract = read_contract(weights)
    except UserError as e:  # not a run, unreadable, damaged
        raise FeatureNetError(f"{path} is not a nestvit classifier run or weights file ({e})") from None
    if contract.model == "feature_net":
        raise FeatureNetError(
            f"{path} holds the FeatureNet of nestvit before 2026-12-05, which is retired: FID features are now a "
            f"classifier run (`nestvit train {FEATURES_RECIPE} --out DIR`, then feature_net=DIR). FIDs measured "
            "with the two networks are not comparable")
    if contract.kind != "classifier" or contract.transform is None:
        raise FeatureNetError(f"{path} is not a classifier (it holds a {contract.kind}, {contract.model!r}); "
                              "FID features come from a classifier trained on the same data")
    loaded = load(weights)
    data = str(contract.info.get("data") or "")
    tag = {"fashion_mnist": "fmnist", "mnist5k": "mnist5k"}.get(data, data or "data")
    return ClassifierFeatures(loaded.model, loaded.transform, f"{tag}_{contract.model}:{sha8(weights)}",
                              data=data or None)


def load_inception_features(path: str | Path | None = None) -> FeatureExtractor:
    """The standard FID network from the user's pytorch-fid weights file (see :mod:`nestvit.generate.inception`)."""
    from .inception import WEIGHTS_FILE, load_fid_inception

    if not path:
        raise FeatureNetError(f"inception features need the weights file: inception:/path/to/{WEIGHTS_FILE}")
    return load_fid_inception(path)


def get_feature_extractor(spec: str, *, cache: str | Path | None = None, dataset: str = "fashion_mnist",
                          pad_to: int = 0, log: Callable[[str], None] | None = print) -> FeatureExtractor:
    """The feature network ``spec`` names.

    ``"auto"``: the ``fid_features`` run in the directory ``cache``, trained there first if it is not finished;
    ``"inception:PATH"``: Inception-v3 from the user's pytorch-fid weights; anything else: a classifier run
    directory or weights file.
    """
    if spec.startswith("inception"):
        return load_inception_features(spec.partition(":")[2] or None)
    if spec == "auto":
        if cache is None:
            raise FeatureNetError("feature_net='auto' needs a cache path")
        return load_feature_net(train_feature_net(dataset, cache, pad_to=pad_to, log=log))
    return load_feature_net(spec)


# --------------------------------------------------------------------------------------------------
# Evaluating a generator
# --------------------------------------------------------------------------------------------------

EVAL_SEED = 12345  # the latents' seed of every evaluation (training's and `nestvit generate eval`'s)


@torch.no_grad()
def generate(generator: nn.Module, n: int, *, batch_size: int = 250, seed: int = 0) -> torch.Tensor:
    """``n`` images in ``[-1, 1]`` from ``generator`` (eval mode) with latents from ``seed``."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same latents on every device
    device = next(generator.parameters()).device
    was = generator.training
    generator.eval()
    out = []
    try:
        for i in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - i), generator.latent_dim, generator=g)
            out.append(generator(z.to(device)).float().clamp(-1, 1).cpu())
    finally:
        generator.train(was)
    return torch.cat(out)


def extract(extractor: FeatureExtractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of images in ``[-1, 1]``."""
    if hasattr(extractor, "both"):
        return extractor.both(images)  # type: ignore[attr-defined]
    return extractor.features(images), extractor.logits(images)


def evaluate_generator(generator: nn.Module, extractor: FeatureExtractor, ref_features: torch.Tensor, *,
                       n: int = 2000, seed: int = EVAL_SEED, kid_subset: int = 1000, kid_subsets: int = 50,
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
