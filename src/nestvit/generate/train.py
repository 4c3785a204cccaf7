"""GAN training for the NesT generator and its baselines.

Objective (StyleGAN2's): non-saturating logistic loss,
``L_D = softplus(D(G(z))) + softplus(-D(x))`` and ``L_G = softplus(-D(G(z)))``, plus the R1 gradient
penalty ``gamma/2 * E ||grad_x D(x)||^2`` on real images, applied lazily every ``r1_every`` D steps
(scaled by ``r1_every``, in the same pass as the D loss). Adam with ``beta1=0, beta2=0.99``, lr 1e-4 for
both networks; an EMA of the generator (``ema_beta``, ramped up as ``min(beta, (1+t)/(10+t))``) is what
samples and metrics use.

A run directory has the classifier runs' layout (``nestvit.train.checkpoint``): ``config.yaml``,
``metrics.jsonl`` (one JSON object per line: training logs and evaluations), ``samples/step_XXXXXX.png``
(fixed latents, EMA generator), the weights ``generator.safetensors``, ``generator_ema.safetensors`` and
``discriminator.safetensors`` (each with its run contract, for ``nestvit.load`` and ``nestvit generate
sample``), and ``state.pt``: step, the three networks, both optimizers and every RNG state, written
atomically and read with ``torch.load(weights_only=True)``. ``state.pt`` is written last, so a run killed
at any moment resumes from a consistent step; resuming restores everything, so N steps in one go and N/2 +
resume + N/2 give bit-identical weights. The EMA is the classifiers' ``ModelEMA``, with its warm-up ramp
and with buffers copied from the raw generator; the conv baseline's BatchNorm statistics are then measured
anew for the averaged weights before every evaluation, sample grid and checkpoint (``ema_bn``, see
docs/generation.md). Runs written before this layout (``checkpoints/step_*``) still sample.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, dump, from_dict, load, save, to_dict
from ..config import apply_overrides as _apply
from ..contract import InputTransform, RunContract
from ..fileio import atomic_path, atomic_write_text
from ..train.checkpoint import STATE_FILE
from ..train.metrics import METRICS_FILE
from ..train.metrics import read_metrics as _read_metrics
from ..train.optim import ModelEMA
from .metrics import EVAL_SEED
from .models import DISCRIMINATORS, build_discriminator, build_generator

__all__ = ["GanConfig", "ConfigError", "load_recipe", "apply_overrides", "r1_penalty", "train_gan",
           "load_generator", "save_grid", "read_metrics", "recompute_bn_stats"]


FOLDER = "imagefolder"  # GanConfig.dataset for your own images (data_root)
FEATURES_COMMAND = ("nestvit train fid_features --set data.name=imagefolder --set data.root=FOLDER --set "
                    "data.img_size=SIZE --set data.channels=C --out RUN; C=3 also --set data.mean=[0.5,0.5,0.5] "
                    "--set data.std=[0.5,0.5,0.5]")  # a feature network for FID on a folder of your images
FOLDER_FEATURES = (f"--set feature_net=RUN, a classifier trained on the same folder at the generator's size and "
                   f"channels ({FEATURES_COMMAND}), or --set feature_net=inception:PATH")


@dataclass(frozen=True)
class GanConfig:
    """A GAN run; recipes declare ``kind: gan`` and are read by the one config system (``nestvit.config``)."""

    KIND: ClassVar[str] = "gan"
    # data
    dataset: str = "fashion_mnist"  # any in-memory set of nestvit.data.load_dataset, or imagefolder (data_root)
    # dataset imagefolder: your images, any layout `nestvit train` reads (class folders, split folders, a CSV; the
    # labels are not used), resized and centre-cropped to the generator's size and channels
    data_root: str | None = None
    pad_to: int = 0  # pad images with background (-1) to this size (e.g. 32); 0 keeps the native size
    max_images: int = 0  # use only the first N training images; 0 = all
    # models (presets of nestvit.generate.models, with config-field overrides)
    generator: str = "nest_28"
    generator_overrides: dict[str, Any] = field(default_factory=dict)
    discriminator: str = "resnet_28"
    discriminator_overrides: dict[str, Any] = field(default_factory=dict)
    # optimisation
    steps: int = 3000
    batch_size: int = 64
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.99
    r1_gamma: float = 1.0
    r1_every: int = 16  # lazy regularisation interval (1 = every step, 0 = off)
    ema_beta: float = 0.999
    # the EMA generator's BatchNorm statistics (conv baseline): "recompute" them for the averaged weights (16
    # batches of latents in train mode, before every evaluation, sample grid and checkpoint), or "copy" the raw
    # generator's (StyleGAN2-ADA's G_ema; what runs before 2026-12-05 did); no effect without BatchNorm
    ema_bn: Literal["recompute", "copy"] = "recompute"
    bf16: bool = False  # torch.autocast(bfloat16) for the forward passes
    tf32: bool = True  # CUDA: fp32 matrix products and convolutions on TF32 tensor cores (as timm); false: full fp32
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 leaves PyTorch's default
    # logging / evaluation
    log_every: int = 50
    sample_every: int = 500
    sample_n: int = 64
    ckpt_every: int = 500
    eval_every: int = 1000  # FID/KID/IS of the EMA generator; 0 = only at the end, -1 = never
    eval_n: int = 2000
    eval_ref_split: str = "test"
    feature_net: str = "auto"  # "auto" (fid_features run in <out>/feature_net) | classifier run | "inception:PATH"
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            *((getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)}")
              for k in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "sample_n")),
            (self.pad_to >= 0, f"pad_to must be >= 0 (0 = the images' own size), got {self.pad_to}"),
            (self.max_images >= 0, f"max_images must be >= 0 (0 = all), got {self.max_images}"),
            *((getattr(self, k) > 0, f"{k} must be > 0, got {getattr(self, k)}") for k in ("lr_g", "lr_d")),
            *((0 <= getattr(self, k) < 1, f"{k} must be in [0, 1), got {getattr(self, k)}")
              for k in ("beta1", "beta2", "ema_beta")),
            (self.r1_gamma >= 0, f"r1_gamma must be >= 0 (0 = no R1), got {self.r1_gamma}"),
            (self.r1_every >= 0, f"r1_every must be >= 0 (0 = no R1), got {self.r1_every}"),
            (0 <= self.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {self.seed}"),
            (self.threads >= 0, f"threads must be >= 0 (0 = PyTorch's default), got {self.threads}"),
            (self.eval_every >= -1, f"eval_every must be >= 1, 0 (only at the end) or -1 (never), got "
                                    f"{self.eval_every}"),
            (self.eval_n >= 2, f"eval_n must be >= 2 (FID needs a covariance), got {self.eval_n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from ..data.datasets import DATASETS

        sets = [name for name, info in DATASETS.items() if info.in_memory]
        if self.dataset not in (*sets, FOLDER):
            raise ConfigError(f"dataset {self.dataset!r}: `nestvit generate train` reads an in-memory set "
                              f"({', '.join(sets)}) or your own images: dataset {FOLDER} with data_root=FOLDER")
        if self.dataset == FOLDER and self.data_root is None:
            raise ConfigError(f"dataset {FOLDER} needs data_root=FOLDER, the folder of your images")
        if self.dataset != FOLDER and self.data_root is not None:
            raise ConfigError(f"data_root={self.data_root} names a folder of your images, read with dataset {FOLDER} "
                              f"(not {self.dataset}); set dataset={FOLDER}")
        if self.dataset == FOLDER and self.pad_to:
            raise ConfigError(f"pad_to={self.pad_to}: images of a folder are resized to the generator's size; leave "
                              "pad_to 0")


# --------------------------------------------------------------------------------------------------
# Recipes and overrides
# --------------------------------------------------------------------------------------------------

def config_from_dict(d: Mapping[str, Any], source: str = "config") -> GanConfig:
    """A ``GanConfig`` from a mapping (a run's ``config.yaml``): ``nestvit.config.from_dict``."""
    # ``keep_checkpoints``: runs before one state.pt per run kept several checkpoint folders
    d = {k: v for k, v in d.items() if k not in ("kind", "keep_checkpoints")}
    try:
        return from_dict(GanConfig, d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_recipe(path: str | Path) -> GanConfig:
    """A GAN recipe (a file, or a built-in name of ``kind: gan``) -> config; unknown keys are an error."""
    return load(GanConfig, path)


def apply_overrides(cfg: GanConfig, items: list[str]) -> GanConfig:
    """``["steps=100", "generator_overrides.depths=[1,1,1]", "bf16=true"]`` -> new config (values are YAML)."""
    return from_dict(GanConfig, _apply(to_dict(cfg), items, GanConfig))


def _model_overrides(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------

def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, mean_i ||grad_x D(x_i)||^2)`` on real images, differentiable (``create_graph=True``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = real.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return logits, grad.float().square().sum(dim=tuple(range(1, grad.ndim))).mean()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _write_png(arr: Any, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def save_images(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """Images in ``[-1, 1]`` ``(B, C, H, W)`` -> one PNG each (``000000.png``, ...), for FID tools that read
    folders; each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = _to_uint8(images)
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"{i:06d}.png")
        _write_png(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(), paths[-1])
    return paths


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None, pad: int = 2) -> Path:
    """Images in ``[-1, 1]`` ``(B, C, H, W)`` -> one PNG grid (grey for C=1), written atomically."""
    x = _to_uint8(images)
    B, C, H, W = x.shape
    nrow = nrow or max(1, int(round(B ** 0.5)))
    rows = -(-B // nrow)
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    path = Path(path)
    _write_png(grid[0].numpy() if C == 1 else grid.permute(1, 2, 0).numpy(), path)
    return path


def _to_unit(images: torch.Tensor, pad_to: int) -> torch.Tensor:
    from .metrics import _to_unit as f

    return f(images, pad_to)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records ([] before the first); a line torn by a kill is skipped."""
    path = Path(run_dir) / METRICS_FILE
    return _read_metrics(path) if path.is_file() else []


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

OWN_DATA = "your images"  # the data of a run trained on images given from Python (train_gan(..., data=))


def _contract(kind: str, name: str, overrides: Mapping[str, Any], role: str, step: int, model: nn.Module,
              cfg: GanConfig, data: str) -> RunContract:
    """The run contract of a GAN checkpoint's network; a generator's transform is its output space ([-1, 1])."""
    transform = None
    if kind == "generator":
        size = (model.img_size, model.img_size)
        transform = InputTransform.default(model.out_chans, size)
    return RunContract(model=f"{kind}_{name}", kwargs=dict(overrides), kind=kind, transform=transform,
                       info={"role": role, "step": step, "data": data})


def save_checkpoint(run_dir: Path, step: int, *, cfg: GanConfig, G: nn.Module, ema: ModelEMA, D: nn.Module,
                    opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, rng: torch.Generator,
                    window: dict[str, Any] | None = None, own_data: bool = False, data_id: str | None = None) -> Path:
    """The three weights files, then ``state.pt`` (the commit point), each written atomically. ``window``: the
    sums of the steps since the last log record (a run stopped between records logs them all on resume).
    ``own_data``: trained on images given from Python, recorded as :data:`OWN_DATA` (not ``cfg.dataset``); a
    folder's images are recorded as the folder. ``data_id``: what the images were (count and hash), for resumes."""
    from ..interop import save_weights
    from ..train.checkpoint import STATE_FILE, atomic_torch_save, capture_rng

    data = OWN_DATA if own_data else cfg.data_root if cfg.dataset == FOLDER else cfg.dataset
    for net, file in ((G, "generator"), (ema.module, "generator_ema")):
        save_weights(net, run_dir / f"{file}.safetensors",
                     contract=_contract("generator", cfg.generator, cfg.generator_overrides, file, step, net, cfg,
                                        data))
    save_weights(D, run_dir / "discriminator.safetensors",
                 contract=_contract("discriminator", cfg.discriminator, cfg.discriminator_overrides, "discriminator",
                                    step, D, cfg, data))
    state = {"kind": "gan", "step": step, "data": data, "data_id": data_id,
             "models": {"generator": G.state_dict(), "generator_ema": ema.state_dict(),
                        "discriminator": D.state_dict()},
             "optimizers": {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
             "rng": capture_rng({"data": rng}), "config": dump(cfg), "window": window}
    return atomic_torch_save(state, run_dir / STATE_FILE)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder holding a GAN run's newest weights: the run itself, or (runs before the classifiers' layout)
    its ``checkpoints/<latest>``."""
    run_dir = Path(run_dir)
    if (run_dir / "generator_ema.safetensors").is_file():
        return run_dir
    ptr = run_dir / "checkpoints" / "latest"
    if not ptr.is_file():
        raise FileNotFoundError(f"{run_dir}: no generator_ema.safetensors; is this a `nestvit generate train` run "
                                "directory that reached its first checkpoint?")
    return run_dir / "checkpoints" / ptr.read_text().strip()


def load_generator(path: str | Path, *, ema: bool = True) -> nn.Module:
    """A generator from a run directory, a checkpoint directory or a ``generator*.safetensors`` file
    (``nestvit.load`` with ``which="ema"`` or ``"raw"``)."""
    from ..contract import PRETRAINED_FILE, ContractError, gan_run_folder, load

    folder = Path(path)
    if folder.is_dir() and gan_run_folder(folder) is None and not (folder / PRETRAINED_FILE).is_file():
        what = "a classifier run" if any((folder / f"{n}.safetensors").is_file() for n in ("best", "last")) else \
            "not a GAN run"
        raise ContractError(f"{folder} is {what} (no generator.safetensors); give the folder of a `nestvit generate "
                            "train` run or a generator*.safetensors file")
    loaded = load(path, "ema" if ema else "raw")
    if not ema and folder.is_file() and loaded.contract.info.get("role") == "generator_ema":
        raise ContractError(f"{folder} is the EMA generator; --raw picks the raw one of a run folder: give the run "
                            "folder or its generator.safetensors")
    if loaded.contract.kind != "generator":
        raise ValueError(f"{loaded.weights} holds a {loaded.contract.kind} ({loaded.contract.model}), not a generator "
                         "written by `nestvit generate train`")
    return loaded.model


def eval_reference(cfg: GanConfig, cache: Path, device: torch.device | str, log: Callable[[str], None], *,
                   images: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, Any]:
    """What a run's FID / KID / IS are measured against: ``(feature network, reference features, their
    Gaussian statistics)`` for ``cfg.feature_net`` (``"auto"``: the ``fid_features`` run in ``cache``) and the
    ``cfg.eval_ref_split`` images of ``cfg.dataset``; for a folder of your images (``imagefolder``), the images
    the GAN trains on (``images`` where the caller has them decoded), as StyleGAN measures FID against its training
    set, with the feature network you name. Training and ``nestvit generate eval`` both use it."""
    from .metrics import extract, gaussian_stats, get_feature_extractor

    if cfg.dataset == FOLDER and cfg.feature_net == "auto":
        raise ConfigError(f"FID on your own images needs a feature network you name: {FOLDER_FEATURES}")
    extractor = get_feature_extractor(cfg.feature_net, cache=cache, dataset=cfg.dataset, pad_to=cfg.pad_to, log=log)
    extractor.to(device)
    trained_on = getattr(extractor, "data", None)
    data = cfg.data_root if cfg.dataset == FOLDER else cfg.dataset
    if trained_on and trained_on != cfg.dataset:  # (a classifier records a folder as imagefolder)
        log(f"note: the feature network {extractor.name} was trained on {trained_on}, this run's data is "
            f"{data}: its features may not describe these images")
    if cfg.dataset == FOLDER:
        ref = _to_unit(images if images is not None else load_train_images(cfg), 0)
    else:
        ref = _to_unit(load_images_of(cfg, cfg.eval_ref_split), cfg.pad_to)
    ref_feats, _ = extract(extractor, ref)
    return extractor, ref_feats, gaussian_stats(ref_feats)


def _is_path(spec: str) -> bool:
    return spec != "auto" and not spec.startswith("inception")


def absolute_feature_net(cfg: GanConfig, recorded_by: Path | None = None,
                         flag: str = "--set feature_net=") -> GanConfig:
    """``cfg`` with a feature network path (a classifier run, ``inception:PATH``) made absolute where it exists
    here, so that a run's config.yaml works from any folder; ``recorded_by``: the run folder whose config.yaml
    named it, for the error of a relative path written by an older version and not found from here."""
    spec = cfg.feature_net
    prefix, path = ("inception:", spec[len("inception:"):]) if spec.startswith("inception:") else ("", spec)
    if not (prefix or _is_path(spec)) or not path or Path(path).is_absolute():
        return cfg
    if Path(path).expanduser().exists():
        return replace(cfg, feature_net=prefix + str(Path(path).expanduser().absolute()))
    if recorded_by is not None:
        from .metrics import FeatureNetError

        raise FeatureNetError(f"{recorded_by}/config.yaml names the feature network {spec}, a path relative to where "
                              f"the run was trained and not found from here ({Path.cwd()}); run the command from "
                              f"there, or give {flag}{prefix}ABSOLUTE_PATH (the same network, for "
                              "comparable numbers)")
    return cfg


def _saved_feature_net(out: Path) -> str | None:
    """The feature network a run's config.yaml names (None: no readable config; the resume says what is wrong)."""
    from ..config import ConfigError, read_run_config

    try:
        saved = read_run_config(out, "gan").get("feature_net")
    except ConfigError:
        return None
    return saved if isinstance(saved, str) else None


def _check_same_feature_net(cfg: GanConfig, saved: str, out: Path) -> None:
    """Refuse, before anything is trained, a resume whose feature network is not ``saved``, the one the run's
    metrics so far were measured with (FIDs of two networks are not comparable)."""
    saved = absolute_feature_net(replace(cfg, feature_net=saved)).feature_net
    path = "" if saved == "auto" else saved.partition(":")[2] if saved.startswith("inception") else saved
    new = cfg.feature_net.partition(":")[2] if cfg.feature_net.startswith("inception:") else cfg.feature_net
    if saved == cfg.feature_net or (path and not Path(path).is_absolute()) or (_is_path(new) and Path(new).exists()):
        return  # the same network, an older relative path, or one that exists: compared by name after the set-up
    if any("feature_net" in r for r in read_metrics(out)):
        from .metrics import FeatureNetError

        raise FeatureNetError(f"{out} was evaluated with feature_net={saved}, not {cfg.feature_net}; FIDs of "
                              "different feature networks are not comparable. Resume without changing feature_net "
                              "(or --set feature_net=" + saved + "), or train a new run")


def evaluate_run(path: str | Path, *, n: int = 10_000, ema: bool = True, feature_net: str | None = None,
                 seed: int = EVAL_SEED, device: str | None = None,
                 log: Callable[[str], None] | None = None) -> dict:
    """FID / KID / IS of a trained generator: ``n`` samples against the run's own reference set.

    ``path``: a ``nestvit generate train`` run folder (or a weights file in it); its ``config.yaml`` names the
    data, the reference split and the feature network (``feature_net`` replaces the latter). With the run's
    ``eval_n`` and the default ``seed`` this repeats the run's last evaluation of the EMA generator. A generator
    without its run folder (a ``save_pretrained`` folder, a copied file) is measured against the test split of
    the data set its weights record, with ``feature_net`` (required then: nothing else names one).
    """
    from ..config import read_run_config
    from ..contract import read_contract, resolve_weights
    from ..train.distributed import resolve_device
    from .metrics import evaluate_generator

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / "config.yaml").is_file() and (run_dir.parent.parent / "config.yaml").is_file():
        run_dir = run_dir.parent.parent  # checkpoints/step_* of runs before the classifiers' layout
    generator = load_generator(path, ema=ema)
    weights = resolve_weights(path, "ema" if ema else "raw")
    info = read_contract(weights).info
    recorded = info.get("data")
    if recorded == OWN_DATA:
        raise ConfigError(f"{path} was trained on images given from Python, which nestvit cannot read again: measure "
                          "it in Python (nestvit.generate.metrics.evaluate_generator with reference features of those "
                          "images), or train it on a folder (dataset imagefolder, data_root=FOLDER)")
    if not (run_dir / "config.yaml").is_file():
        cfg = _config_of_a_lone_generator(path, generator, recorded, feature_net)
    else:
        try:
            raw = read_run_config(run_dir, "gan")
        except ConfigError as e:
            raise ConfigError(f"{e}; `nestvit generate eval` reads the data and the feature network from the run "
                              "folder's config.yaml") from None
        cfg = config_from_dict(raw, str(run_dir / "config.yaml"))
    if feature_net:
        cfg = absolute_feature_net(apply_overrides(cfg, [f"feature_net={feature_net}"]))
    else:
        cfg = absolute_feature_net(cfg, recorded_by=run_dir, flag="--feature-net ")
    if cfg.dataset == FOLDER and cfg.feature_net == "auto":
        raise ConfigError(f"{path} was trained on your images ({cfg.data_root}) without a feature network for FID: "
                          "name one with --feature-net RUN, a classifier trained on the same folder at the generator's "
                          f"size ({FEATURES_COMMAND}), or --feature-net inception:PATH")
    dev = resolve_device(device)
    images = load_train_images(cfg, size=generator.img_size, channels=generator.out_chans) \
        if cfg.dataset == FOLDER else None
    extractor, ref_feats, ref_stats = eval_reference(cfg, run_dir / "feature_net", dev, log, images=images)
    measured = {r["feature_net"] for r in read_metrics(run_dir) if "feature_net" in r}
    if measured and extractor.name not in measured:
        log(f"note: the run's own evaluations used the feature network {', '.join(sorted(measured))}, this one is "
            f"{extractor.name}: its FIDs are not on the run's curve")
    result = evaluate_generator(generator.to(dev), extractor, ref_feats, n=n, seed=seed, ref_stats=ref_stats)
    role = {"generator_ema": "ema", "generator": "raw"}.get(info.get("role"), "ema" if ema else "raw")
    folder = cfg.dataset == FOLDER
    return {"run": str(run_dir), "weights": str(weights), "step": info.get("step"), "generator": role,
            "data": cfg.data_root if folder else cfg.dataset, "split": "train" if folder else cfg.eval_ref_split,
            "seed": seed, "device": str(dev), **result}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def own_images(data: str | None) -> bool:
    """Whether the data a GAN's weights record are your own images (a folder, or images given from Python), not
    one of nestvit's in-memory data sets: no reference split or feature network to measure FID with."""
    from ..data.datasets import DATASETS

    return bool(data) and not (data in DATASETS and DATASETS[data].in_memory)


def _config_of_a_lone_generator(path: Path, generator: nn.Module, data: str | None,
                                feature_net: str | None) -> GanConfig:
    """What to measure a generator found without its run folder against: ``data``, the data set its weights
    record (its test split; images zero-padded to the generator's size where they are smaller), and
    ``feature_net``."""
    if not feature_net or not data:
        missing = " and ".join(w for w, ok in (("--feature-net (the classifier run the FIDs to compare with used)",
                                                feature_net), ("a data set in its weights", data)) if not ok)
        raise ConfigError(f"{path}: not in the run folder it was trained in, whose config.yaml names the data and "
                          f"the feature network; without it, `nestvit generate eval` needs {missing}")
    if own_images(data):  # a folder of your images: its own images are the reference
        return GanConfig(dataset=FOLDER, data_root=str(data), feature_net=feature_net)
    cfg = GanConfig(dataset=str(data), feature_net=feature_net)
    native = load_images_of(cfg, cfg.eval_ref_split).shape[-1]
    return replace(cfg, pad_to=0 if generator.img_size == native else generator.img_size)


def load_images_of(cfg: GanConfig, split: str) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` images of ``split`` of ``cfg.dataset`` (an in-memory set), one clear error if absent."""
    from ..data import DatasetError, load_dataset

    try:
        return load_dataset(cfg.dataset, split=split).images
    except DatasetError as e:  # the GAN config has no data.download key: the fix that applies here
        fix = f"fetch the files once from Python: nestvit.data.load_dataset({cfg.dataset!r}, download=True)"
        raise DatasetError(re.sub(r"set data\.download=true \(.*?\) to fetch the original files", fix, str(e))) \
            from None


def load_train_images(cfg: GanConfig, *, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` training images: ``cfg.dataset``'s train split (its first ``cfg.max_images``), or
    (``imagefolder``) the images of ``cfg.data_root`` (its train split, if it has split folders) decoded to the
    generator's size and channels (``size`` / ``channels`` where the caller has the generator; ``cfg.max_images``
    of them drawn with ``cfg.seed``)."""
    if cfg.dataset == FOLDER:
        from ..data import DatasetError, load_images

        if size is None or channels is None:
            with torch.random.fork_rng():  # the generator built for its size only: the run's draws are untouched
                probe = build_generator(cfg.generator, **_model_overrides(cfg.generator_overrides))
            size, channels = probe.img_size, probe.out_chans
        if not Path(cfg.data_root).expanduser().exists():
            raise ConfigError(f"data_root {cfg.data_root} does not exist (moved? a run reads its images from where "
                              "they were: nestvit generate train --resume RUN --set data_root=NEW_PATH)")
        try:
            ds = load_images(cfg.data_root, "train", holdout=0, size=size, channels=channels)
        except DatasetError as e:
            raise ConfigError(f"data_root: {e} (a GAN reads every image of class folders or a CSV, and the train "
                              "split of split folders)") from None
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images] \
            if cfg.max_images else torch.arange(len(ds))  # a seeded share of every class, not the first classes
        return torch.stack([ds[int(i)][0] for i in keep.sort().values])
    images = load_images_of(cfg, "train")
    return images[:cfg.max_images] if cfg.max_images else images


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, *, batches: int = 16, batch_size: int = 64, seed: int = 0) -> bool:
    """Replace ``model``'s BatchNorm running statistics by their average over ``batches`` batches of latents.

    The statistics that go with averaged (EMA) weights are not the raw generator's: they are measured here
    with the EMA weights, in train mode, with a cumulative average (``momentum=None``); latents come from a
    generator seeded with ``seed``, so the global random state is untouched. Returns False (and does
    nothing) for a model without BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same latents on every device
    device = next(model.parameters()).device
    for _ in range(batches):
        model(torch.randn(batch_size, model.latent_dim, generator=gen).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


def _misfit(path: Path, state: dict, cfg: GanConfig) -> str:
    """One line: a GAN state that does not fit the config's networks, the keys that differ, and what to do."""
    import yaml

    from ..train.loop import _changed_keys

    try:
        saved = yaml.safe_load(state["config"]) if isinstance(state.get("config"), str) else {}
    except yaml.YAMLError:
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    nets = ("generator", "generator_overrides", "discriminator", "discriminator_overrides")
    changed = [k for k in _changed_keys(saved, to_dict(cfg)) if k.split(".")[0] in nets] if saved else []
    differ = f" (the configs differ in {', '.join(changed[:6])})" if changed else ""
    return (f"{path} does not fit the config's networks{differ}. Resume with the run's own config.yaml (no --set of "
            "generator or discriminator keys), or start a new run with another --out")


def train_gan(cfg: GanConfig, out_dir: str | Path, *, resume: bool = False, data: torch.Tensor | None = None,
              stop_at: int | None = None, log: Callable[[str], None] | None = None, device: str | None = None) -> dict:
    """Train (or resume) a GAN run in ``out_dir``; returns a summary dict.

    ``data``: uint8 ``(N, C, H, W)`` images instead of ``cfg.dataset`` (your own images: recorded as
    :data:`OWN_DATA`; no evaluations; resume with the same images). ``stop_at``: end (with a
    checkpoint) after this many steps although the run is configured for ``cfg.steps`` (tests of resume).
    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available). The networks and the feature network live
    there; the data, the latents and every random draw stay on the CPU (one generator, the same draws on any
    device), a batch at a time moved over.
    """
    from ..cli_args import writable_dir

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = writable_dir(out_dir)
    if not resume and ((out / STATE_FILE).exists() or (out / "checkpoints" / "latest").exists()):
        raise ValueError(f"{out} already holds a run; resume it (nestvit generate train --resume {out}) or pick "
                         "another --out")
    if resume and data is None and (out / STATE_FILE).is_file():
        from ..train.checkpoint import load_state

        if load_state(out / STATE_FILE).get("data") == OWN_DATA:
            raise ValueError(f"{out} was trained on images given from Python, not on {cfg.dataset}; resume it the "
                             "same way, with the same images: train_gan(cfg, RUN, resume=True, data=images)")
    saved = _saved_feature_net(out) if resume else None
    cfg = absolute_feature_net(cfg, recorded_by=out if saved is not None and saved == cfg.feature_net else None)
    if cfg.data_root is not None and Path(cfg.data_root).expanduser().exists():  # recorded absolute: any folder
        cfg = replace(cfg, data_root=str(Path(cfg.data_root).expanduser().absolute()))
    if saved is not None:
        _check_same_feature_net(cfg, saved, out)
    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as closing:  # the metrics log, closed however the run ends
            return _train_gan(cfg, out, resume=resume, data=data, stop_at=stop_at, log=log, device=device,
                              closing=closing)
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only


def _train_gan(cfg: GanConfig, out: Path, *, resume: bool, data: torch.Tensor | None, stop_at: int | None,
               log: Callable[[str], None], device: str | None, closing: contextlib.ExitStack) -> dict:
    from ..fileio import remove_stale_temporaries
    from ..system import use_tf32
    from ..train.distributed import resolve_device
    from ..train.interrupt import Stopped, StopRequest, stopped_at_once
    from ..train.metrics import MetricsLog

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images = data if data is not None else load_train_images(cfg)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"training images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    data_id = None  # your images: which they were, so that a resume on other ones says so
    if data is not None or cfg.dataset == FOLDER:
        import hashlib

        digest = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()[:8]
        data_id = f"{len(images)} images, sha256 {digest}"

    dev = resolve_device(device)
    use_tf32(dev, cfg.tf32)
    torch.manual_seed(cfg.seed)
    G = build_generator(cfg.generator, **_model_overrides(cfg.generator_overrides)).to(dev)
    D = build_discriminator(cfg.discriminator, **_model_overrides(cfg.discriminator_overrides)).to(dev)
    size = cfg.pad_to or images.shape[-1]
    if G.img_size != size or G.out_chans != images.shape[1]:
        raise ValueError(f"generator {cfg.generator} makes {G.out_chans}x{G.img_size}x{G.img_size} images but the data "
                         f"are {images.shape[1]}x{size}x{size}; pick a matching preset or set generator_overrides")
    if D.img_size != size or D.in_chans != images.shape[1]:
        same = sorted(k for k in DISCRIMINATORS if k.rpartition("_")[2] == cfg.generator.rpartition("_")[2])
        raise ValueError(f"discriminator {cfg.discriminator} takes {D.in_chans}x{D.img_size}x{D.img_size} images but "
                         f"the data are {images.shape[1]}x{size}x{size}; pick the preset of that size"
                         + (f" ({' or '.join(same)}, as the generator {cfg.generator})" if same else "")
                         + " or set discriminator_overrides")
    if cfg.batch_size > len(images):
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(images)} training images; set "
                         f"batch_size to at most {len(images)} (or use more images"
                         + (": max_images)" if data is None else ")"))
    # the EMA generator: samples and metrics use it; its weights are averaged with a warm-up ramp, its buffers
    # (the conv baseline's BatchNorm statistics) copied from the raw generator at every update, and with
    # ema_bn="recompute" measured anew for the averaged weights before each use (the next update overwrites
    # them again, so training and resume do not depend on it)
    ema = ModelEMA(G, cfg.ema_beta, warmup=True, copy_buffers=True)
    G_ema = ema.module

    measured_at = [-1]  # the step whose statistics G_ema holds (no update in between: measured once)

    def ready_ema(at: int) -> None:
        if cfg.ema_bn == "recompute" and measured_at[0] != at:
            recompute_bn_stats(G_ema, batch_size=cfg.batch_size, seed=cfg.seed + at)
            measured_at[0] = at
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    rng = torch.Generator().manual_seed(cfg.seed)
    fixed_z = torch.randn(cfg.sample_n, G.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(dev)

    step, window = 0, None
    if resume:
        from ..train.checkpoint import load_state, restore_rng

        if not (out / STATE_FILE).is_file():
            old = " (written by an older nestvit: it samples but does not resume)" if (out / "checkpoints").is_dir() \
                else ""
            raise FileNotFoundError(f"{out}: no {STATE_FILE} to resume from{old}")
        state = load_state(out / STATE_FILE)
        if state.get("kind") != "gan":
            raise ValueError(f"{out / STATE_FILE} is not the state of a GAN run; resume it with `nestvit train "
                             "--resume`")
        try:
            G.load_state_dict(state["models"]["generator"])
            ema.load_state_dict(state["models"]["generator_ema"])
            D.load_state_dict(state["models"]["discriminator"])
            opt_g.load_state_dict(state["optimizers"]["generator"])
            opt_d.load_state_dict(state["optimizers"]["discriminator"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch's error lists every key: say it in one line
            raise ConfigError(_misfit(out / STATE_FILE, state, cfg)) from e
        restore_rng(state["rng"], {"data": rng})
        step = int(state["step"])
        window = state.get("window")
        if state.get("data_id") and data_id and state["data_id"] != data_id:
            log(f"warning: the training images changed since the run's last checkpoint (then {state['data_id']}, now "
                f"{data_id}): the resumed run is not the run that was never stopped")
        log(f"resumed {out} at step {step}")
    removed = remove_stale_temporaries(out)  # left by writes of a killed run
    if removed:
        log(f"note: removed {len(removed)} temporary file(s) a killed run left in {out}")

    # evaluation set-up (feature network + reference features), only when evaluations are on
    extractor = ref_feats = ref_stats = None
    if cfg.eval_every >= 0 and data is None and not (cfg.dataset == FOLDER and cfg.feature_net == "auto"):
        try:
            extractor, ref_feats, ref_stats = eval_reference(cfg, out / "feature_net", dev, log,
                                                             images=images if cfg.dataset == FOLDER else None)
        except Stopped as e:  # training the feature network, before the run has a config or state to resume
            raise Stopped(e.signal_name, e.step, e.run_dir, how="the same nestvit generate train command (or "
                          "train_gan call): the feature network goes on from there, then the GAN trains") from None
        measured = {r["feature_net"] for r in read_metrics(out) if "feature_net" in r} if resume else set()
        if measured - {extractor.name}:
            from .metrics import FeatureNetError

            raise FeatureNetError(
                f"{out}: its metrics so far were measured with the feature network {', '.join(sorted(measured))}, "
                f"not {extractor.name} ({cfg.feature_net}); FIDs of different feature networks are not comparable. "
                "Resume with --set feature_net=<that network>, or train the run afresh")
    save(cfg, out / "config.yaml")  # after every check: a refused resume leaves the run's config as it was
    params = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"  # noqa: E731
    log(f"run dir: {out}\ngenerator {cfg.generator} ({params(G)} parameters), discriminator {cfg.discriminator} "
        f"({params(D)}) on {dev}\ndata: {OWN_DATA if data is not None else cfg.data_root or cfg.dataset} {len(images)} "
        "images of "
        f"{images.shape[1]}x{size}x{size}; {cfg.steps} steps of batch {cfg.batch_size}")
    if data is not None and cfg.eval_every >= 0:
        log("note: no FID/KID/IS evaluations: they compare with reference images nestvit reads (a data set, or a "
            "folder: dataset imagefolder)")
    elif extractor is None and cfg.dataset == FOLDER and cfg.eval_every >= 0:
        log(f"note: no FID/KID/IS evaluations: for your images name a feature network, {FOLDER_FEATURES}")

    # a new run drops every record of one killed before its first checkpoint (its step-0 evaluations included:
    # they are measured again); a resumed run drops what was logged after its checkpoint
    metrics = MetricsLog(out, truncate_after_step=step if resume else -1)
    closing.callback(metrics.close)
    if metrics.dropped:
        log(f"note: dropped {metrics.dropped} record(s) of {metrics.path} logged after "
            + (f"the checkpoint at step {step}" if resume else "the start of a run killed before its first checkpoint"))
    write = metrics.write

    def evaluate(at: int) -> dict | None:
        if extractor is None:
            return None
        from .metrics import evaluate_generator

        ready_ema(at)
        res = evaluate_generator(G_ema, extractor, ref_feats, n=cfg.eval_n, ref_stats=ref_stats)
        row = {"step": at, "kind": "eval", **res}
        write(row)
        log(f"step {at}: FID {res['fid']:.2f}  KID {res['kid']:.4f}  IS {res['is']:.2f}  "
            f"[features: {res['feature_net']}, n={res['n']}]")
        return row

    if step == 0 and extractor is not None and not any(r.get("kind") == "eval_floor" for r in read_metrics(out)):
        # the floor: FID of real training images against the reference set at the same sample size
        from .metrics import extract as _extract
        from .metrics import frechet_distance, gaussian_stats

        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(999))[:cfg.eval_n]
        f, _ = _extract(extractor, _to_unit(images[idx], cfg.pad_to))
        st = gaussian_stats(f)
        write({"step": 0, "kind": "eval_floor", "fid": frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma),
               "n": int(len(idx)), "feature_net": extractor.name, "note": "real train images vs reference split"})

    if step == 0 and cfg.eval_every > 0:
        evaluate(0)  # the untrained generator: where the FID curve starts

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    G.train()
    D.train()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True, desc="gan",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    # "wall" / "cpu" in the log count from the run's start, across resumes (an interrupted run's time included)
    before = next((r for r in reversed(read_metrics(out)) if r.get("kind") == "train" and "cpu" in r), {}) \
        if resume else {}
    t_start = time.perf_counter() - float(before.get("wall", 0.0))
    cpu_start = time.process_time() - float(before.get("cpu", 0.0))
    acc: dict[str, float] = dict((window or {}).get("acc", {}))  # the sums since the last log record
    n_acc, t_train = int((window or {}).get("n", 0)), float((window or {}).get("t", 0.0))
    last_eval = None
    saved = [step if resume else None]  # the step of state.pt
    stop = closing.enter_context(StopRequest(  # Ctrl-C / SIGTERM: a checkpoint, then stop
        at_once=lambda: stopped_at_once(step, saved[0], out, f"nestvit generate train --resume {out}")))
    while step < last:
        t0 = time.perf_counter()
        idx = torch.randint(len(images), (cfg.batch_size,), generator=rng)
        real = _to_unit(images[idx], cfg.pad_to).to(dev, non_blocking=True)
        z = torch.randn(cfg.batch_size, G.latent_dim, generator=rng).to(dev, non_blocking=True)
        z2 = torch.randn(cfg.batch_size, G.latent_dim, generator=rng).to(dev, non_blocking=True)
        do_r1 = cfg.r1_gamma > 0 and cfg.r1_every > 0 and step % cfg.r1_every == 0

        # discriminator step
        with torch.no_grad(), autocast:
            fake = G(z).float()
        with autocast:
            if do_r1:
                real_logits, r1 = r1_penalty(D, real)
            else:
                real_logits, r1 = D(real), None
            fake_logits = D(fake)
        loss_d = F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()
        total_d = loss_d + (r1 * (cfg.r1_gamma / 2) * cfg.r1_every if r1 is not None else 0.0)
        opt_d.zero_grad(set_to_none=True)
        total_d.backward()
        opt_d.step()

        # generator step
        D.requires_grad_(False)
        with autocast:
            gen_logits = D(G(z2))
        loss_g = F.softplus(-gen_logits.float()).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        ema.update(G, step=step)
        step += 1
        t_train += time.perf_counter() - t0

        vals = {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "d_real": real_logits.float().mean().item(),
                "d_fake": fake_logits.float().mean().item()}
        if r1 is not None:
            vals["r1"] = r1.item()
        for k, v in vals.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == last:
            row = {"step": step, "kind": "train", **{k: v / (n_acc if k != "r1" else max(1, -(-n_acc // cfg.r1_every)))
                                                      for k, v in acc.items()},
                   "sec_per_step": round(t_train / max(1, n_acc), 4), "wall": round(time.perf_counter() - t_start, 1),
                   "cpu": round(time.process_time() - cpu_start, 1)}
            write(row)
            bar.set_postfix(loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}")
            acc, n_acc, t_train = {}, 0, 0.0
        if step % cfg.sample_every == 0 or step == last:
            ready_ema(step)
            with torch.no_grad():
                save_grid(G_ema(fixed_z), out / "samples" / f"step_{step:06d}.png")
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != cfg.steps:  # the last step: below
            last_eval = evaluate(step)
        stopping = stop.requested  # read once: a signal between two reads would skip the save below
        if step % cfg.ckpt_every == 0 or step == last or stopping:
            ready_ema(step)  # generator_ema.safetensors carries the statistics of its own weights
            save_checkpoint(out, step, cfg=cfg, G=G, ema=ema, D=D, opt_g=opt_g, opt_d=opt_d, rng=rng,
                            window={"acc": acc, "n": n_acc, "t": t_train}, own_data=data is not None,
                            data_id=data_id)
            saved[0] = step
        if stopping and step < last:
            bar.close()
            raise Stopped(stop.signal_name, step, out, how=f"nestvit generate train --resume {out}" if data is None
                          else f"train_gan(cfg, {str(out)!r}, resume=True, data=images), the same images")
    stop.close()  # the final evaluation: Ctrl-C stops it at once
    bar.close()
    if step == cfg.steps and cfg.eval_every >= 0:
        done = [r for r in read_metrics(out) if r.get("kind") == "eval" and r.get("step") == step
                and r.get("n") == cfg.eval_n and extractor is not None and r.get("feature_net") == extractor.name]
        last_eval = done[-1] if done else evaluate(step) or last_eval  # a finished run resumed: not twice
    summary = {"step": step, "run_dir": str(out), "wall_seconds": round(time.perf_counter() - t_start, 1),
               "cpu_seconds": round(time.process_time() - cpu_start, 1),
               "eval": last_eval, "generator_params": sum(p.numel() for p in G.parameters()),
               "discriminator_params": sum(p.numel() for p in D.parameters()), "device": str(dev)}
    if step == cfg.steps:  # a finished run, as the classifiers' runs: its summary beside its weights
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
