"""Training configuration: ``TrainConfig``, typed frozen dataclasses read by the one config system.

A recipe (``kind: classifier``) is a small YAML file whose top-level keys are ``TrainConfig`` fields;
nested sections (``model``, ``data``, ``aug``, ``optim``, ``schedule``, ``ema``, ``distill``) are
mappings. Reading, ``--set`` overrides (dotted keys: ``optim.lr=1e-3``,
``model.overrides.drop_path_rate=0.1``), type checks and ``ConfigError`` are ``nestvit.config``'s, shared
with the GAN's ``GanConfig``; allowed values are ``Literal`` types.

The batch is *global* (all devices and all accumulation steps together); the learning rate is given
for a reference batch (``optim.lr_ref_batch``, 256 as DeiT and the official NesT code) and scaled
linearly. Both derivations are printed when a run starts, never silent.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .. import config as _config
from ..config import RECIPE_DIR, ConfigError, check_choices, recipe_summary, to_dict  # noqa: F401 (re-exported)
from ..data.augment import AugmentConfig

Precision = Literal["fp32", "bf16", "fp16", "auto"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
TtaMode = Literal["none", "flip", "shift", "flip-shift"]  # nestvit.data.augment.TTA_MODES

# Keys a recipe cannot set because they are derived: the augmentation normalises with data.mean/std.
_MEASURED = ("None: measured on in-memory training images, ImageNet's for image folders and shards, or what "
             "model.weights learnt")
DERIVED_KEYS = {"aug.mean": f"data.mean ({_MEASURED})", "aug.std": f"data.std ({_MEASURED})"}


@dataclass(frozen=True)
class ModelSection:
    # a registered model (`nestvit models`); null: the architecture of model.weights' run contract (fine-tuning)
    name: str | None = "nest_tiny_cifar"
    overrides: dict[str, Any] = field(default_factory=dict)  # create_model keywords; num_classes, in_chans
    # and img_size default to the data set's
    # initialise from these weights (a run folder or weights file of nestvit, a timm checkpoint, or a published
    # tag of `nestvit pretrained`, e.g. nest_tiny_224.jx_in1k); weights of
    # another class count, image size or channel count adapt (nestvit.adapt), and the run header says how
    weights: str | None = None
    # recompute each transformer layer's activations in backward (model.set_grad_checkpointing): less memory,
    # about one more forward pass of time; a runtime setting, not part of the saved model arguments
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class DataSection:
    name: str = "mnist5k"  # a name of nestvit.data.DATASETS, or "synthetic" (generated; tests and benchmarks)
    # data directory; None: $NESTVIT_DATA_DIR, else ~/.cache/nestvit/datasets ($NESTVIT_CACHE_DIR for ~/.cache/
    # nestvit). imagefolder: root/<class>/*, root/<split>/<class>/* or a CSV file of path,label[,split];
    # webdataset: root/*.tar or root/<split>/*.tar
    root: str | None = None
    download: bool = False  # fetch missing files (mnist, fashion_mnist, cifar*, stl10)
    train_split: str = "train"
    # the split evaluated after every eval_every epochs; None: "test" for the built-in sets, else the first of
    # val, test that exists, else "holdout" (the run's config.yaml records the one chosen)
    eval_split: str | None = None
    # imagefolder / webdataset: the share of each class of the training split held out as the "holdout" split when
    # it is evaluated (always with no split folders); fixed by a hash of each file's path, the same in every run
    holdout: float = 0.1
    classes: str | None = None  # imagefolder / webdataset: a text file of class names, one a line (fixes the order)
    # per-channel normalisation; None: measured on in-memory training images, ImageNet's for image folders and
    # shards (greyscale: its channel mean), or the normalisation model.weights learnt
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_to: int | None = None  # resize in-memory images to resize_to x resize_to first (bilinear, antialiased)
    pad_to: int | None = None  # zero-pad in-memory images to pad_to x pad_to (e.g. 28 -> 32 for CIFAR models)
    limit_train: int | None = None  # keep only the first N training images (quick runs, tests)
    limit_eval: int | None = None  # keep only the first N evaluation images
    # imagefolder / webdataset: images are resized and centre-cropped to this size; synthetic: the size; None: the
    # model's input size (model.overrides.img_size, else the registered model's)
    img_size: int | None = None
    workers: int | None = None  # imagefolder / webdataset: DataLoader processes; None: min(4, cores - 1)
    # imagefolder / webdataset: decode images to 1 (greyscale) or 3 (RGB) channels; None: imagefolder 1 when its
    # training images are greyscale files (up to 64 files' headers read), else 3 (the run's config.yaml records it)
    channels: int | None = None
    random_resized_crop: float | None = None  # imagefolder training split: Inception-style crop of this..1 of the
    # area (aspect 3/4..4/3) resized to img_size, instead of the centre crop; the official ImageNet recipes: 0.08


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2.5e-4  # base learning rate for a global batch of lr_ref_batch
    lr_ref_batch: int = 256  # lr is scaled by global_batch / lr_ref_batch; 0 = use lr as it is
    weight_decay: float = 0.05  # decoupled (AdamW)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    no_decay: Literal["recipe", "pos_embed_only", "1d_and_tokens"] = "recipe"  # see optim.param_groups
    clip_grad: float = 0.0  # max global gradient norm; 0 = no clipping (official NesT: 0)
    # sharpness-aware minimisation (Foret et al. 2021): before every step the weights move by sam_rho along the
    # gradient of the first sam_batch images of each device's batch (0 or more than a micro-batch: its first
    # micro-batch), and the step uses the gradient there; 0 = off (e.g. 0.05). Costs one more forward/backward
    # of those images a step
    sam_rho: float = 0.0
    sam_batch: int = 0


@dataclass(frozen=True)
class ScheduleSection:
    name: Literal["cosine", "step", "constant"] = "cosine"  # cosine per step; step: lr * gamma ** (step // step_every)
    warmup_epochs: float = 0.0  # linear warmup from warmup_start * lr to lr
    warmup_start: float = 0.0  # fraction of the peak lr where warmup starts
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio * peak lr
    step_every: int = 200  # "step": optimizer steps between decays (RTNT paper: 200)
    gamma: float = 0.96  # "step": decay factor (RTNT paper: 0.96)


@dataclass(frozen=True)
class EmaSection:
    decay: float = 0.0  # exponential moving average of the weights; 0 = off (e.g. 0.9998)


@dataclass(frozen=True)
class DistillSection:
    teacher: str | None = None  # a registered model name or "convnet"; None: the model teacher_weights records
    teacher_weights: str | None = None  # the trained teacher (a run folder or weights file); None = no distillation
    teacher_overrides: dict[str, Any] = field(default_factory=dict)  # create_model keywords of the teacher
    type: Literal["hard", "soft"] = "hard"  # hard: the teacher's argmax (DeiT's best); soft: KL at temperature tau
    alpha: float = 0.5  # weight of the distillation term; the label term gets 1 - alpha
    tau: float = 1.0  # soft distillation temperature


@dataclass(frozen=True)
class TrainConfig:
    KIND: ClassVar[str] = "classifier"  # what a recipe declares as `kind:` (nestvit.config)
    DERIVED_KEYS: ClassVar[dict[str, str]] = DERIVED_KEYS
    epochs: int = 10
    # Stop once this many minutes of the run (training and its evaluations) have passed; 0 = off. The
    # schedule then decays by the larger of step and time progress, so the LR reaches its floor at the
    # deadline even on a slower machine (`epochs` becomes an upper bound). Not bit-reproducible.
    time_budget_min: float = 0.0
    global_batch: int = 256  # images per optimizer step, all devices and accumulation steps together
    micro_batch: int | None = None  # images per forward pass on one device; None: global_batch / world size
    eval_batch: int = 500  # images per forward pass during evaluation (per device)
    seed: int = 0
    precision: Precision = "fp32"  # bf16: autocast; fp16: autocast + GradScaler, CUDA only; auto:
    # bf16 where the device has fast bf16 kernels, else fp32 (nestvit.system.resolve_precision)
    compile: bool = False  # torch.compile the training forward
    tf32: bool = True  # CUDA: fp32 matrix products and convolutions on TF32 tensor cores (as timm); false: full fp32
    log_every: int = 20  # optimizer steps between metrics.jsonl step records
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    # Test-time views (nestvit.data.augment.TTA_MODES) of the final evaluation, which then reports both the
    # single-view and the multi-view top-1; under a time budget its cost is reserved inside the budget.
    tta: TtaMode = "none"
    # "balanced": each class's term of the label loss (not distillation's) is weighted by N / (K * n_class) of the
    # training split (K: its classes with images; scikit-learn's "balanced"), so a class of few images counts as
    # much as a large one; "none": every image the same. Evaluations are not weighted; where the classes differ in
    # size they report the balanced accuracy too (best.safetensors is still the best top-1)
    class_weights: Literal["none", "balanced"] = "none"
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = at epoch ends only
    progress: bool = True  # tqdm progress bar (rank 0 only)
    threads: int | None = None  # CPU threads per process (torch.set_num_threads); None: torch's default
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugmentConfig = field(default_factory=AugmentConfig.plain)  # nestvit.data.augment.AugmentConfig
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    ema: EmaSection = field(default_factory=EmaSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self) -> None:
        for name in ("", "model", "data", "aug", "optim", "schedule", "ema", "distill"):  # the Literal fields
            check_choices(getattr(self, name) if name else self, f"{name}." if name else "")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.time_budget_min >= 0, f"time_budget_min must be >= 0, got {self.time_budget_min}"),
            (self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}"),
            (self.micro_batch is None or self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}"),
            (self.eval_batch >= 1, f"eval_batch must be >= 1, got {self.eval_batch}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.checkpoint_every >= 0,
             f"checkpoint_every must be >= 0 (0 = at epoch ends only), got {self.checkpoint_every}"),
            (0 <= self.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {self.seed}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.optim.lr_ref_batch >= 0,
             f"optim.lr_ref_batch must be >= 0 (0 = lr not scaled), got {self.optim.lr_ref_batch}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (self.optim.eps > 0, f"optim.eps must be > 0, got {self.optim.eps}"),
            (all(0 <= b < 1 for b in self.optim.betas), f"optim.betas must be in [0, 1), got {self.optim.betas}"),
            (self.optim.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = off), got {self.optim.clip_grad}"),
            (self.optim.sam_rho >= 0, f"optim.sam_rho must be >= 0 (0 = off), got {self.optim.sam_rho}"),
            (self.optim.sam_batch >= 0,
             f"optim.sam_batch must be >= 0 (0 = the first micro-batch), got {self.optim.sam_batch}"),
            (self.schedule.step_every >= 1, f"schedule.step_every must be >= 1, got {self.schedule.step_every}"),
            (self.schedule.warmup_epochs >= 0,
             f"schedule.warmup_epochs must be >= 0, got {self.schedule.warmup_epochs}"),
            (0 <= self.schedule.warmup_start <= 1,
             f"schedule.warmup_start must be in [0, 1], got {self.schedule.warmup_start}"),
            (0 <= self.schedule.min_lr_ratio <= 1,
             f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}"),
            (self.schedule.gamma > 0, f"schedule.gamma must be > 0, got {self.schedule.gamma}"),
            (self.data.limit_train is None or self.data.limit_train >= 1,
             f"data.limit_train must be >= 1 (images) or null (all), got {self.data.limit_train}"),
            (self.data.limit_eval is None or self.data.limit_eval >= 1,
             f"data.limit_eval must be >= 1 (images) or null (all), got {self.data.limit_eval}"),
            (self.data.img_size is None or self.data.img_size >= 1,
             f"data.img_size must be >= 1 (pixels) or null (the model's), got {self.data.img_size}"),
            (self.data.workers is None or self.data.workers >= 0,
             f"data.workers must be >= 0 (0 = load in the training process) or null (by the cores), got "
             f"{self.data.workers}"),
            (self.data.channels in (None, 1, 3),
             f"data.channels must be 1 (greyscale), 3 (RGB) or null (by the images), got {self.data.channels}"),
            (0 <= self.data.holdout < 1,
             f"data.holdout must be in [0, 1) (the share of each class held out; 0 = none), got {self.data.holdout}"),
            (self.data.std is None or all(v > 0 for v in self.data.std),
             f"data.std must be positive (it divides the pixels), got {self.data.std}"),
            (self.data.pad_to is None or self.data.pad_to >= 1,
             f"data.pad_to must be a positive image size or null, got {self.data.pad_to}"),
            (self.aug.crop_padding >= 0, f"aug.crop_padding must be >= 0 (pixels), got {self.aug.crop_padding}"),
            (self.aug.ra_num_ops >= 0, f"aug.ra_num_ops must be >= 0, got {self.aug.ra_num_ops}"),
            (self.aug.mixup_alpha >= 0, f"aug.mixup_alpha must be >= 0 (0 = off), got {self.aug.mixup_alpha}"),
            (self.aug.cutmix_alpha >= 0, f"aug.cutmix_alpha must be >= 0 (0 = off), got {self.aug.cutmix_alpha}"),
            *((0 <= getattr(self.aug, k) <= 1, f"aug.{k} must be in [0, 1], got {getattr(self.aug, k)}")
              for k in ("ra_prob", "mix_switch_prob", "mix_prob", "random_erasing")),
            (0 <= self.aug.label_smoothing < 1,
             f"aug.label_smoothing must be in [0, 1), got {self.aug.label_smoothing}"),
            (self.data.random_resized_crop is None or 0 < self.data.random_resized_crop <= 1,
             f"data.random_resized_crop must be in (0, 1] (the smallest crop's share of the area; the official "
             f"ImageNet recipes: 0.08) or null, got {self.data.random_resized_crop}"),
            (self.data.resize_to is None or self.data.resize_to >= 1,
             f"data.resize_to must be a positive image size or null, got {self.data.resize_to}"),
            (0.0 <= self.ema.decay < 1.0, f"ema.decay must be in [0, 1), got {self.ema.decay}"),
            (0.0 <= self.distill.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.distill.alpha}"),
            (self.distill.tau > 0, f"distill.tau must be > 0, got {self.distill.tau}"),
            (self.distill.teacher is None or self.distill.teacher_weights is not None,
             "distill.teacher needs distill.teacher_weights (a trained teacher; an untrained one teaches noise)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def batch_plan(self, world_size: int) -> tuple[int, int, int]:
        """``(per_device_batch, micro_batch, accumulation_steps)`` for ``world_size`` devices.

        ``global_batch = world_size * per_device_batch`` and ``per_device_batch = micro * accum``.
        """
        if self.global_batch % world_size:
            raise ConfigError(f"global_batch {self.global_batch} is not divisible by the world size {world_size}; "
                              f"choose a multiple of {world_size}")
        per_device = self.global_batch // world_size
        micro = min(self.micro_batch or per_device, per_device)
        if per_device % micro:
            raise ConfigError(f"the per-device batch {per_device} (global_batch {self.global_batch} / "
                              f"{world_size} devices) is not a multiple of micro_batch {micro}")
        return per_device, micro, per_device // micro

    def scaled_lr(self) -> float:
        """The peak learning rate: ``optim.lr * global_batch / optim.lr_ref_batch`` (unscaled if ref is 0)."""
        if self.optim.lr_ref_batch <= 0:
            return self.optim.lr
        return self.optim.lr * self.global_batch / self.optim.lr_ref_batch


# --------------------------------------------------------------------------------------------------
# the config system (nestvit.config) for TrainConfig
# --------------------------------------------------------------------------------------------------

def valid_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every key ``--set`` accepts for ``TrainConfig`` (or a section class)."""
    return _config.valid_keys(cls or TrainConfig, prefix, TrainConfig)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """``nestvit.config.from_dict`` for ``TrainConfig`` (or one of its sections)."""
    return _config.from_dict(cls, data, prefix, base, TrainConfig)


def replace(cfg: TrainConfig, **sections: Any) -> TrainConfig:
    """``dataclasses.replace`` for a nested field: ``replace(cfg, data={"mean": (0.5,)})``."""
    changes = {}
    for name, value in sections.items():
        current = getattr(cfg, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **changes)


def builtin_recipes() -> dict[str, Path]:
    """Built-in training recipe name -> file: the ``src/nestvit/recipes/*.yaml`` of ``kind: classifier``."""
    return _config.builtin_recipes(TrainConfig.KIND)


def read_recipe(recipe: str | Path) -> tuple[dict[str, Any], str]:
    """``(raw dict, name)`` of a training recipe file path or built-in name."""
    return _config.read_recipe(recipe, TrainConfig.KIND)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["optim.lr=1e-3", "model.overrides.depths=[1, 1]"]`` to a nested dict (copied)."""
    return _config.apply_overrides(raw, overrides, TrainConfig)


def load_config(recipe: str | Path | dict[str, Any] | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | str = ()) -> TrainConfig:
    """A ``TrainConfig`` from a recipe (path, built-in name, dict or None for defaults) and ``--set`` overrides
    (``["epochs=3"]``, ``"epochs=3"`` or ``{"epochs": 3, "optim.lr": 1e-3}``)."""
    return _config.load(TrainConfig, recipe, overrides)


def save_config(cfg: TrainConfig, path: Path) -> None:
    _config.save(cfg, path)
