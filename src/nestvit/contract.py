"""The run contract: what a saved nestvit model is, and how an image becomes its input.

Every weights file that nestvit writes (training runs, distillation, GAN runs,
``nestvit.interop.save_weights``) carries in its safetensors metadata

- ``nestvit.contract``: one JSON document, :class:`RunContract` -- the registry name and constructor
  keyword arguments of the model, its kind (classifier, generator, ...), the class names and the
  :class:`InputTransform` (channels, size, resize / crop / zero-padding, mean and std);
- ``nestvit.sha256``: a SHA-256 of the tensors, checked on every load, so a damaged file is refused
  instead of evaluating at chance.

One loader reads it back, :func:`load` (``nestvit.load``): a run directory or a weights file in, the
model and its transform out. ``nestvit eval``, ``predict``, ``explain``, ``generate sample``, ``bench``
and ``experiment`` all go through it. Files written before the contract existed (``model`` /
``model_kwargs`` / ``mean`` / ``std`` / ``pad_to`` keys of training runs, ``model`` / ``overrides`` /
``role`` of GAN runs) still load: :func:`RunContract.from_metadata` reads the old keys.
"""

from __future__ import annotations

import contextlib
import json
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import UserError
from .standalone import CONTRACT_KEY  # the metadata key; the one file that runs exports without nestvit has it

__all__ = ["CONTRACT_KEY", "ContractError", "InputTransform", "Loaded", "RunContract", "UnreadableImageError",
           "contract_of", "load", "open_image", "read_contract", "resolve_weights"]

EXPORTED_SUFFIXES = (".onnx", ".pt2")  # files of `nestvit export` (nestvit.export.load_exported)
CONTRACT_VERSION = 1
Kind = Literal["classifier", "generator", "discriminator"]
Resize = Literal["stretch", "center-crop"]
Interpolation = Literal["bilinear", "bicubic"]
# one image for InputTransform.read: a path (str, Path), a PIL image, a uint8 numpy array (H, W[, C]) or tensor
# (C, H, W)
ImageLike = Any

# which weights of a run directory: classifier runs write best/last/ema, GAN runs a generator, its EMA and a
# discriminator per checkpoint
CLASSIFIER_WEIGHTS = ("best", "last", "ema")
GAN_WEIGHTS = {"ema": "generator_ema", "raw": "generator", "discriminator": "discriminator"}
PRETRAINED_FILE = "model.safetensors"  # the one weights file of a save_pretrained / Hugging Face Hub folder
HUB_PREFIX = "hf-hub:"  # "hf-hub:org/name": such a folder on the Hugging Face Hub (as timm names them)


class ContractError(UserError, ValueError):
    """A path that is not a nestvit run or weights file, or metadata that does not describe a model."""


class UnreadableImageError(ContractError):
    """One image file that is missing, not an image, damaged or too large: a command over many files skips it."""


# --------------------------------------------------------------------------------------------------
# The input transform
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputTransform:
    """How an image becomes the model's input; the same steps as the data pipeline the model trained on.

    A file is decoded to ``channels`` (grayscale or RGB), then

    - ``resize="stretch"`` (in-memory data sets: MNIST, Fashion-MNIST, CIFAR, ...): resized to ``content``
      (``(H, W)``, default ``size``) whatever its aspect ratio, and zero-padded, centred, to ``size``;
    - ``resize="center-crop"`` (image folders): its shorter side resized to ``size / crop_pct`` and the
      centre ``size`` cropped, as ``nestvit.data.ImageFolderDataset`` does;

    and a uint8 batch ``(B, C, H, W)`` is normalised as ``(x / 255 - mean) / std`` by :meth:`__call__`.
    ``exif_orientation``: a file (or PIL image) is first turned upright as its EXIF orientation tag says, as
    image viewers and training's image folders do; False in contracts written before nestvit did so (their
    models saw the pixels as stored). ``interpolation``: the centre crop's resize filter, ``"bilinear"`` as
    training's image folders resize, ``"bicubic"`` for published ImageNet weights (as timm evaluates them).
    """

    channels: int
    size: tuple[int, int]  # (H, W) the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Resize = "stretch"
    content: tuple[int, int] | None = None  # stretch: the image's (H, W) before zero padding to ``size``
    crop_pct: float = 0.875  # center-crop: the crop's share of the resized shorter side
    exif_orientation: bool = True  # turn images upright as their EXIF tag says (False: as stored)
    interpolation: Interpolation = "bilinear"  # center-crop: the resize filter (Pillow's)

    def __post_init__(self) -> None:
        for key in ("size", "content"):  # an int (one side) or a list: the (H, W) tuple every reader expects
            value = getattr(self, key)
            if value is None and key == "content":
                continue
            try:
                hw = (operator.index(value),) * 2 if not isinstance(value, (tuple, list)) else \
                    tuple(operator.index(v) for v in value)
            except TypeError:
                hw = ()
            if len(hw) != 2 or min(hw) <= 0:
                raise ContractError(f"input transform: {key} must be (H, W), two positive ints, not {value!r}")
            object.__setattr__(self, key, hw)
        if self.resize == "center-crop" and self.size[0] != self.size[1]:
            raise ContractError(f"input transform: center-crop makes square images (as image-folder training does), "
                                f"not {self.size[0]}x{self.size[1]}; use resize='stretch' for another shape")
        if not 0 < self.crop_pct <= 1:
            raise ContractError(f"input transform: crop_pct {self.crop_pct} must be in (0, 1] (the crop's share of "
                                "the resized shorter side; 0.875 is the default)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ContractError(f"input transform: mean {self.mean} / std {self.std} need {self.channels} values "
                                "(one per channel)")
        if self.resize not in ("stretch", "center-crop"):
            raise ContractError(f"input transform: resize must be 'stretch' or 'center-crop', not {self.resize!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ContractError(f"input transform: interpolation must be 'bilinear' or 'bicubic', not "
                                f"{self.interpolation!r}")
        if self.resize == "stretch" and self.interpolation != "bilinear":
            raise ContractError(f"input transform: interpolation {self.interpolation!r} applies to "
                                "resize='center-crop'; 'stretch' resizes bilinearly, as in-memory training does")
        if not isinstance(self.exif_orientation, bool):
            raise ContractError(f"input transform: exif_orientation must be true or false, not "
                                f"{self.exif_orientation!r}")
        if not all(v > 0 for v in self.std):
            raise ContractError(f"input transform: std {self.std} must be positive (it divides the pixels)")

    @classmethod
    def default(cls, channels: int, size: Sequence[int] | int) -> InputTransform:
        """Images scaled to ``[-1, 1]`` (mean = std = 0.5), stretched to ``size``: for models saved without one."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return cls(channels=channels, size=hw, mean=(0.5,) * channels, std=(0.5,) * channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputTransform:
        d = dict(d)
        for key in ("size", "content", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        d.setdefault("exif_orientation", False)  # written before nestvit turned images upright: as stored
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def read(self, image: ImageLike) -> torch.Tensor:
        """uint8 ``(channels, H, W)`` of an image, resized (cropped, padded) as the model expects.

        ``image``: a file's path (``~`` expanded), an open ``PIL.Image``, or the pixels of one image of any size:
        a uint8 numpy array ``(H, W)`` / ``(H, W, C)`` or a uint8 tensor ``(C, H, W)`` (C 1, 3 or 4). An image in
        memory gives what its lossless file gives (pixels in an array are taken as upright: a file's or PIL
        image's EXIF orientation tag turns it, see ``exif_orientation``); a JPEG file (centre crop) is decoded
        at a reduced scale first, as training's image folders do, which an image already decoded cannot be: a
        level or two on photos, tens of levels on fine-grained noise. Give the path where the exact training
        pipeline matters.
        """
        import numpy as np

        if self.channels not in (1, 3):
            raise ContractError(f"the model takes {self.channels}-channel input; images give 1 (grayscale) "
                                "or 3 (RGB)")
        img, path = _as_pil(image)
        if self.resize == "center-crop":  # the very decoding of image-folder training (JPEG draft mode included)
            from .data.datasets import DatasetError, decode_image

            if img is None and not path.is_file():
                raise UnreadableImageError(_not_a_file(path))
            try:  # an unreadable or huge file: one clear error
                x = decode_image(img if img is not None else path, size=self.size[0],
                                 resize_size=round(self.size[0] / self.crop_pct), channels=self.channels,
                                 exif_orientation=self.exif_orientation, interpolation=self.interpolation,
                                 name=path, hint="")
            except DatasetError as e:
                raise UnreadableImageError(str(e)) from None
            return x.contiguous()
        from .data.datasets import convert_image, resize_images
        from .standalone import upright

        with contextlib.nullcontext(img) if img is not None else open_image(path) as opened:
            turned = upright(opened) if self.exif_orientation else opened
            array = np.asarray(convert_image(turned, "L" if self.channels == 1 else "RGB"), dtype=np.uint8)
        x = torch.from_numpy(array.copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        x = resize_images(x[None], self.content or self.size)[0]  # the resize of training's data.resize_to
        H, W = self.size
        h, w = x.shape[-2:]
        if (h, w) != (H, W):
            if h > H or w > W:
                raise ContractError(f"input transform: content {h}x{w} is larger than the input size {H}x{W}")
            top, left = (H - h) // 2, (W - w) // 2
            x = torch.nn.functional.pad(x, (left, W - w - left, top, H - h - top))
        return x.contiguous()

    def read_batch(self, images: Sequence[ImageLike] | ImageLike) -> torch.Tensor:
        """uint8 ``(B, channels, H, W)`` of images (see :meth:`read`; one image: a batch of one; a uint8 tensor
        ``(B, C, H, W)``: its images, each resized)."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:  # a batch: its images
            images = list(images)
        elif isinstance(images, (str, Path, torch.Tensor)) or hasattr(images, "__array__") \
                or not hasattr(images, "__iter__"):  # one path (not its characters), array (not its rows), PIL image
            images = [images]
        else:
            images = list(images)  # a generator of paths (Path.glob) too
        if len(images) == 0:
            raise ContractError("read_batch: no images given")
        return torch.stack([self.read(p) for p in images])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> normalised float32, as in training and evaluation."""
        from .data.augment import eval_transform

        return eval_transform(images, self.mean, self.std)


def _as_pil(image: Any) -> tuple[Any, Path]:
    """``(PIL image or None, name)`` of what :meth:`InputTransform.read` takes: None for a path (read later)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        return None, Path(image).expanduser()
    if isinstance(image, Image.Image):
        return image, Path(getattr(image, "filename", "") or "(PIL image)")
    pixels = "the pixels of one image: uint8 (H, W) or (H, W, C) numpy arrays, uint8 (C, H, W) tensors"
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                                      and image.shape[0] not in (1, 3, 4)):
            last = " (channels last? x.permute(2, 0, 1))" if image.ndim == 3 and image.shape[-1] in (1, 3, 4) else ""
            raise ContractError(f"read: a {image.dtype} tensor of shape {tuple(image.shape)}{last}; it takes "
                                f"{pixels} (float tensors in 0..1: (x * 255).round().to(torch.uint8))")
        image = image.cpu().numpy() if image.ndim == 2 else image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                                   and image.shape[2] not in (1, 3, 4)):
            raise ContractError(f"read: a {image.dtype} array of shape {image.shape}; it takes {pixels} "
                                "(floats in 0..1: (a * 255).round().astype(np.uint8))")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image), \
            Path("(array)")
    raise ContractError(f"read: cannot read a {type(image).__name__!r} object; it takes a file's path, a PIL image or "
                        f"{pixels}")


def _not_a_file(path: Path) -> str:
    return f"{path}: " + ("a folder, not an image file: pass its files" if path.is_dir() else "no such image file")


def open_image(path: str | Path):
    """``PIL.Image`` of a file, with one clear :class:`ContractError` for a missing, unreadable or huge file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise UnreadableImageError(_not_a_file(path))
    img = None
    try:
        img = Image.open(path)
        img.load()
        return img
    except Image.DecompressionBombError as e:
        if img is not None:
            img.close()
        raise UnreadableImageError(f"{path}: the image is too large to open safely ({e}); downscale it first") \
            from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if img is not None:
            img.close()
        raise UnreadableImageError(f"{path}: cannot read the image ({e})") from None


# --------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------

def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples model configs hold (nested too)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _lists(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class RunContract:
    """A saved model: what to build, what it outputs, and how its input is prepared."""

    model: str  # registry name (``nestvit models``)
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_model(model, **kwargs)
    kind: Kind = "classifier"
    classes: tuple[str, ...] | None = None  # classifier: name of each output
    transform: InputTransform | None = None  # classifier: its input; generator: its output space
    info: dict[str, Any] = field(default_factory=dict)  # data set, epoch, step, top-1 ... (display only)

    def build(self) -> nn.Module:
        """The model, freshly initialised (load weights into it).

        Files of older versions still build: NesT's retired ``cpu_chunk_tokens`` is dropped, and a NesT entry
        recorded with an option of ``nestvit.models.nest_variants`` builds that entry's ``nestv_*`` twin.
        """
        from .models.nest_variants import legacy_nest_kwargs
        from .registry import create_model

        name, kwargs = legacy_nest_kwargs(self.model, _tuples(self.kwargs))
        return create_model(name, **kwargs)

    def to_json(self) -> str:
        return json.dumps({"version": CONTRACT_VERSION, "model": self.model, "kwargs": _lists(self.kwargs),
                           "kind": self.kind, "classes": None if self.classes is None else list(self.classes),
                           "transform": None if self.transform is None else _lists(self.transform.to_dict()),
                           "info": _lists(self.info)})

    def to_metadata(self) -> dict[str, str]:
        return {CONTRACT_KEY: self.to_json(), "model": self.model}

    @classmethod
    def from_json(cls, text: str, *, source: str = "metadata") -> RunContract:
        try:
            d = json.loads(text)
            if int(d.get("version", 1)) > CONTRACT_VERSION:
                raise ContractError(f"{source}: written by a newer nestvit (contract version {d['version']}); "
                                    "upgrade nestvit to read it")
            t = d.get("transform")
            return cls(model=str(d["model"]), kwargs=dict(d.get("kwargs") or {}), kind=d.get("kind", "classifier"),
                       classes=None if d.get("classes") is None else tuple(str(c) for c in d["classes"]),
                       transform=None if t is None else InputTransform.from_dict(t), info=dict(d.get("info") or {}))
        except ContractError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ContractError(f"{source}: the nestvit run contract is damaged ({type(e).__name__}: {e})") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, source: str = "metadata") -> RunContract | None:
        """The contract of a weights file's metadata (current or older layouts); None if it records no model."""
        if CONTRACT_KEY in meta:
            return cls.from_json(meta[CONTRACT_KEY], source=source)
        if "model" not in meta:
            return None
        try:
            return _legacy(meta)
        except (ValueError, KeyError, TypeError) as e:
            raise ContractError(f"{source}: cannot read its model metadata ({type(e).__name__}: {e})") from None


def _legacy(meta: Mapping[str, str]) -> RunContract:
    """Metadata written before the contract: training runs, GAN runs, hand-made files."""
    j = lambda key, default=None: json.loads(meta[key]) if key in meta else default  # noqa: E731
    name = meta["model"]
    role = meta.get("role", "")
    if role:  # nestvit generate train, before the contract
        kind = "discriminator" if role == "discriminator" else "generator"
        return RunContract(model=f"{kind}_{name}", kwargs=j("overrides", {}), kind=kind,
                           info={"role": role, "step": int(meta.get("step", 0))})
    if "model_kwargs" in meta:  # nestvit train, before the contract
        kwargs = j("model_kwargs")
    else:  # a hand-made file: model + model_overrides (or config.model_overrides)
        kwargs = j("model_overrides")
        if kwargs is None:
            cfg = j("config", {})
            kwargs = cfg.get("model_overrides", {}) if isinstance(cfg, dict) else {}
    transform = None
    if "mean" in meta and "std" in meta:
        with torch.device("meta"):  # only its input size and channels are needed
            model = RunContract(model=name, kwargs=kwargs).build()
        pad_to, unpadded = j("pad_to"), j("unpadded")
        c = model.in_chans
        mean, std = (tuple(v) * (c if len(v) == 1 else 1) for v in (j("mean"), j("std")))  # one value: every channel
        transform = InputTransform(channels=c, size=tuple(model.img_size), mean=mean, std=std,
                                   resize="center-crop" if _is_folder(j("data")) else "stretch",
                                   content=tuple(unpadded) if pad_to and unpadded else None,
                                   exif_orientation=False)  # before nestvit turned images upright
    classes = j("classes")
    info = {k: j(k) for k in ("data", "epoch", "step", "top1") if k in meta}
    return RunContract(model=name, kwargs=kwargs, classes=None if classes is None else tuple(classes),
                       transform=transform, info=info)


def _is_folder(data: str | None) -> bool:
    from .data.datasets import DATASETS

    return data in DATASETS and not DATASETS[data].in_memory


def contract_of(model: nn.Module, **fields: Any) -> RunContract | None:
    """The contract of a model built by ``create_model`` (it records its name and arguments), with ``fields``."""
    spec = getattr(model, "registry_spec", None)
    if spec is None:
        return None
    # pretrained: its input and tag; nestvit.load: the input and classes its file records
    recorded = {k: spec[k] for k in ("transform", "classes", "info") if spec.get(k) is not None}
    kwargs = dict(spec["kwargs"])
    if head_changed(model):  # reset_classifier since it was built: the recorded class names are not its own
        kwargs["num_classes"] = model.num_classes
        recorded = {k: v for k, v in recorded.items() if k != "classes"}
    return RunContract(model=spec["model"], kwargs=kwargs, **{**recorded, **fields})


def input_transform(model: nn.Module) -> InputTransform | None:
    """How ``model``'s inputs are prepared, as its weights record it (timm's data config): a model from published
    weights (``create_model(name, pretrained=True)``) or from a run or ``save_pretrained`` folder read with
    ``nestvit.load`` / ``from_pretrained`` / ``create_model(name, pretrained=FOLDER)``. None for a model whose
    weights record none (built by ``create_model``, or with ``weights=``): choose one (``InputTransform(...)``).

    ``t = nestvit.input_transform(model)``; ``t.read(path)`` -> uint8 ``(C, H, W)``, ``t(batch)`` -> float
    ``(B, C, H, W)`` normalised: the model's input.
    """
    spec = getattr(model, "registry_spec", None) or getattr(getattr(model, "model", None), "registry_spec", None)
    return (spec or {}).get("transform")


def head_changed(model: nn.Module) -> bool:
    """Whether ``model``'s classifier is not the one it was built with: ``reset_classifier`` since (for any class
    count), or another number of classes."""
    built = getattr(getattr(model, "cfg", None), "num_classes", None)
    return getattr(model, "head_reset", False) or (built is not None and getattr(model, "num_classes", built) != built)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A saved model ready to use, and how to feed it."""

    model: nn.Module  # in eval mode, on the CPU
    transform: InputTransform  # image file -> read(); uint8 batch -> __call__()
    contract: RunContract
    weights: Path  # the file the weights came from
    config: Any = None  # the run's config (TrainConfig or GanConfig) when the file sits in its run directory

    @property
    def classes(self) -> list[str]:
        """Class names (``class0`` ... where the file records none)."""
        if self.contract.classes is not None:
            return list(self.contract.classes)
        return [f"class{k}" for k in range(int(getattr(self.model, "num_classes", 0)))]

    @classmethod
    def of_model(cls, model: nn.Module, weights: Path) -> Loaded:
        """A model built by ``create_model`` (in memory, or from published weights ``weights``) as the commands
        read a run: the contract it records, its input transform (else stretched to its size, mean = std = 0.5)."""
        contract = contract_of(model)
        if contract is None:
            raise ContractError("the model records no registry name (it was not built by nestvit.create_model); "
                                "build it with create_model, or pass its run folder")
        transform = contract.transform or InputTransform.default(_channels(model),
                                                                 getattr(model, "img_size", (224, 224)))
        return cls(model=model, transform=transform, contract=contract, weights=weights)

    def describe(self) -> str:
        """Which weights these are, for the commands' output: ``runs/a/best.safetensors (epoch 3 of 10, top-1
        91.20 %)``, from what the file records (a file that records nothing: its path alone)."""
        info = self.contract.info if self.contract is not None else {}
        if info.get("pretrained") and self.config is None and published_tag(info["pretrained"]):
            return f"{info['pretrained']} (published weights, {self.weights})"
        said = []
        if isinstance(info.get("epoch"), int):
            total = getattr(self.config, "epochs", None)
            budget = getattr(self.config, "time_budget_min", None)  # stopped by the clock: its epochs, not a plan
            said.append(f"epoch {info['epoch']}" + (f" of {total}" if isinstance(total, int) and not budget else ""))
        if isinstance(info.get("top1"), (int, float)):
            said.append(f"top-1 {info['top1']:.2f} %")
        return f"{self.weights}" + (f" ({', '.join(said)})" if said else "")

    def __repr__(self) -> str:  # one line in a notebook, not the module tree and the whole config
        params = sum(p.numel() for p in self.model.parameters())
        model = self.contract.model if self.contract is not None else type(self.model).__name__
        n = getattr(self.model, "num_classes", None)
        t = self.transform
        what = f", {n} classes" if n is not None and (self.contract is None or self.contract.kind == "classifier") \
            else ""
        seen = f", input {t.channels}x{t.size[0]}x{t.size[1]} {t.resize}" if t is not None else ""
        size = f", {params:,} parameters" if params else ""  # an export holds none of torch's
        return f"Loaded({model}{size}{what}{seen}, weights={str(self.weights)!r})"


def gan_run_folder(path: Path) -> Path | None:
    """The folder of a ``nestvit generate train`` run's weights: the run itself, or the latest
    ``checkpoints/step_*`` of runs written before the classifiers' layout; None if ``path`` is no GAN run."""
    if (path / "generator.safetensors").is_file():
        return path
    if (path / "checkpoints" / "latest").is_file():
        from .generate.train import latest_checkpoint

        return latest_checkpoint(path)
    return None


def resolve_weights(path: str | Path, which: str | None = None) -> Path:
    """A weights file: ``path`` itself, or the ``which`` weights of a run directory.

    Classifier runs: ``best`` (default; falls back to ``last``), ``last``, ``ema``. GAN runs (their latest
    checkpoint, or a ``checkpoints/step_*`` directory): ``ema`` (default, the EMA generator), ``raw``,
    ``discriminator``.
    """
    if str(path).startswith(HUB_PREFIX):  # a save_pretrained folder on the Hugging Face Hub: its local copy
        from .hub import hub_folder

        path = hub_folder(str(path))
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        from .errors import did_you_mean
        from .pretrained import PUBLISHED, published

        if published(str(path)) is not None:
            raise ContractError(f"{path} is a published tag, not a file: nestvit.load('{path}') and the commands read "
                                f"it, and nestvit.create_model('{path}', pretrained=True) builds it")
        tags = [p.tag for p in PUBLISHED] if "." in path.name and path.parent == Path(".") and path.suffix.lower() \
            not in (".safetensors", ".pth", ".pt", ".bin", ".onnx", ".pt2", ".npz", ".msgpack") else []  # a tag?
        raise ContractError(f"{path}: no such run directory or weights file"
                            + (did_you_mean(str(path), tags) or (" nor a published tag (nestvit pretrained lists them)"
                                                                 if tags else "")))
    ck = gan_run_folder(path)
    if ck is not None:
        which = which or "ema"
        if which not in GAN_WEIGHTS:
            raise ContractError(f"{path} is a GAN run: choose weights {', '.join(GAN_WEIGHTS)}, not {which!r}")
        found = ck / f"{GAN_WEIGHTS[which]}.safetensors"
        if not found.is_file():
            raise ContractError(f"{ck}: no {found.name}; the checkpoint is incomplete")
        return found
    has = [n for n in CLASSIFIER_WEIGHTS if (path / f"{n}.safetensors").is_file()]
    if not has and (path / PRETRAINED_FILE).is_file():  # a save_pretrained / Hub folder: its one model
        if which not in (None, "best", "ema"):
            raise ContractError(f"{path} is a save_pretrained folder: it holds one model ({PRETRAINED_FILE}), no "
                                f"{which!r} weights")
        return path / PRETRAINED_FILE
    which = which or "best"
    if which not in CLASSIFIER_WEIGHTS:
        raise ContractError(f"unknown weights {which!r} for a training run; choose {', '.join(CLASSIFIER_WEIGHTS)}")
    for name in [which, "last"] if which == "best" else [which]:
        if name in has:
            return path / f"{name}.safetensors"
    if has:
        why = " (the run was trained without an EMA: ema.decay 0)" if which == "ema" else ""
        raise ContractError(f"{path} has no {which}.safetensors{why}; it has {', '.join(has)}")
    from .train.checkpoint import STATE_FILE

    if (path / STATE_FILE).is_file():  # a training run stopped before its first epoch ended
        raise ContractError(f"{path}: no weights yet (a run writes them at the end of each epoch; this one was "
                            f"stopped before); continue it with nestvit train --resume {path}")
    if (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file():  # a run killed before its first
        import re  # checkpoint: nothing to go on from

        gan = re.search(r"^kind:\s*gan\b", (path / "config.yaml").read_text(errors="replace"), re.M)
        raise ContractError(f"{path}: no weights: the run was stopped before its first checkpoint; train it again "
                            f"(nestvit {'generate train' if gan else 'train'} {path}/config.yaml --out {path})")
    raise ContractError(f"{path}: no weights files (best/last/ema.safetensors, {PRETRAINED_FILE}): give a training "
                        "run's folder, a save_pretrained folder or a weights file")


def _run_config(weights: Path, kind: str) -> Any:
    """The config of the run a weights file sits in (its folder's ``config.yaml``; for GAN runs before the
    classifiers' layout, two folders up), read by the config class of the contract's kind."""
    for folder in (weights.parent, weights.parent.parent.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                if kind == "classifier":
                    from .train.config import load_config

                    return load_config(cfg)
                from .config import read_run_config
                from .generate.train import config_from_dict

                return config_from_dict(read_run_config(folder, "gan"), str(cfg))
            except Exception as e:  # noqa: BLE001 - the weights stand alone; a stale config is only a warning
                warnings.warn(f"{cfg}: not read ({e}); the weights load without it", stacklevel=3)
                return None
    return None


def read_contract(path: str | Path, which: str | None = None) -> RunContract:
    """The contract of a run directory or weights file, from its metadata alone (no tensors are read)."""
    from .interop import read_state_dict

    if Path(path).suffix in EXPORTED_SUFFIXES:
        from .export import exported_contract

        return exported_contract(path)
    weights = resolve_weights(path, which)
    contract = RunContract.from_metadata(read_state_dict(weights, tensors=False)[1], source=str(weights))
    if contract is None:
        raise no_model_error(weights)
    return contract


def no_model_error(weights: Path) -> ContractError:
    """The error for weights that record no model (a timm or ``torch.save`` file), with every way to name it."""
    return ContractError(f"{weights}: records no model (a timm or torch.save file, not written by nestvit); name its "
                         "architecture (`nestvit models`; its size options where they are not the default): training "
                         "--set model.name=NAME --set model.overrides.KEY=VALUE, explain --model NAME --set "
                         "KEY=VALUE, Python nestvit.load(path, model=NAME, overrides={...}); or save it once with a "
                         "contract that every command reads: nestvit.interop.save_weights(nestvit.create_model(NAME, "
                         "weights=PATH, **OVERRIDES), 'model.safetensors')")


def load(path: str | Path, which: str | None = None, *, model: str | None = None,
         overrides: Mapping[str, Any] | None = None) -> Loaded:
    """A saved model and its input transform, from a run directory or a weights file.

    ``which`` picks the weights of a run directory (see :func:`resolve_weights`). ``model`` / ``overrides``
    name the architecture for files that record none (a plain timm or ``torch.save`` state dict); for files
    that do, ``overrides`` replace recorded keyword arguments (e.g. ``drop_path_rate``).
    """
    from .interop import load_weights, read_state_dict

    path = path if str(path).startswith(HUB_PREFIX) else Path(path).expanduser()
    if Path(path).suffix in EXPORTED_SUFFIXES:  # a file of `nestvit export`: one set of weights, its own runtime
        if which is not None or model is not None or overrides:
            raise ContractError(f"{path} is an exported model: its weights and architecture are fixed; give the run "
                                "folder to choose weights or change the model")
        from .export import load_exported

        return load_exported(path)
    if (tag := published_tag(path)) is not None:  # published weights (nestvit pretrained), downloaded once
        if which is not None:
            raise ContractError(f"{path} is a published tag: one set of weights (--weights / which={which!r} choose "
                                "among a run folder's)")
        if model is not None or overrides:
            raise ContractError(f"{path} is a published tag: its architecture is fixed; to change it, "
                                f"nestvit.create_model('{path}', pretrained=True, ...)")
        return _load_published(tag)
    if which in CLASSIFIER_WEIGHTS and Path(path).is_file() and Path(path).stem in set(CLASSIFIER_WEIGHTS) - {which}:
        warnings.warn(f"which={which!r} chooses among a run folder's weights; {path} is one file (the run's "
                      f"{Path(path).stem} weights), used as given", stacklevel=2)
    weights = resolve_weights(path, which)
    _, meta = read_state_dict(weights, tensors=False)
    contract = RunContract.from_metadata(meta, source=str(weights))
    if contract is None or (model is not None and model != contract.model):
        if model is None:
            raise no_model_error(weights)
        contract = RunContract(model=model)
    if overrides:
        contract = replace(contract, kwargs={**contract.kwargs, **overrides})
    net = contract.build()
    load_weights(net, weights)
    transform = contract.transform
    if transform is None:
        transform = InputTransform.default(_channels(net), getattr(net, "img_size", (32, 32)))
        if contract.kind == "classifier":
            h, w = transform.size
            warnings.warn(f"{weights} records no input transform: images are stretched to {h}x{w} and scaled to "
                          "[-1, 1] (mean = std = 0.5); if the model was trained otherwise, save it with "
                          "nestvit.interop.save_weights(model, path, transform=InputTransform(...))", stacklevel=2)
    # the model remembers what the file records (not a guessed transform, not the run's results): its save_weights
    # and save_pretrained keep them
    net.registry_spec.update(transform=contract.transform, classes=contract.classes,
                             info={k: v for k, v in contract.info.items() if k == "pretrained"})
    return Loaded(model=net.eval(), transform=transform, contract=contract, weights=weights,
                  config=_run_config(weights, contract.kind))


def published_tag(path: str | Path) -> str | None:
    """``path`` when it names published weights (``nest_tiny_224.jx_in1k``, ``nestvit pretrained``) and no file or
    folder of that name exists here, else None."""
    from .pretrained import published

    return str(path) if published(str(path)) is not None and not Path(path).exists() else None


def _load_published(tag: str) -> Loaded:
    """Published weights as the commands read a run: the model, its input transform (the publisher's data
    config) and its class names (ImageNet-1k's, ``nestvit.pretrained.imagenet_classes``)."""
    from .pretrained import download, published
    from .registry import create_model

    return Loaded.of_model(create_model(tag, pretrained=True).eval(), download(published(tag), progress=False))


def _channels(net: nn.Module) -> int:
    return int(getattr(net, "in_chans", None) or getattr(net, "out_chans", 3))
