"""A training config's model, and the run contract its weights files carry.

``build_model`` turns the config's model section into a model; ``run_contract`` describes what that
model is and how its input was prepared (``nestvit.contract``), so ``nestvit.load`` needs nothing else
to evaluate, predict or explain from a weights file copied out of its run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import InputTransform, RunContract
from ..data.datasets import DATASETS
from ..layers import to_2tuple
from .config import DataSection, ModelSection


def build_model(section: ModelSection, *, num_classes: int, in_chans: int, img_size: tuple[int, int] | int,
                adapt: bool = True, key: str = "model.overrides", classes: Sequence[str] | None = None
                ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, keyword arguments it was built with)``; ``section.overrides`` (the config's ``key``) may not
    contradict the data's class count, channels and size: the model is built for the data.

    With ``section.weights`` the model starts from them, adapted (``adapt``) to this data's class count,
    image size and channel count (``nestvit.adapt``; what changed is in ``model.adapt_notes``); ``section.name`` None
    takes the architecture from the weights' run contract (fine-tuning a trained run). ``section.weights`` may
    be a published tag (``nest_tiny_224.jx_in1k``, ``nestvit.pretrained``): downloaded once, then adapted.
    ``classes`` (the data's class names): a head kept from weights whose run named its classes follows the names
    (:func:`follow_class_names`).
    """
    from ..contract import ContractError, read_contract, resolve_weights
    from ..interop import load_weights
    from ..registry import create_model

    data = {"num_classes": num_classes, "in_chans": in_chans,
            "img_size": list(img_size) if isinstance(img_size, tuple) else img_size}
    from ..pretrained import load_pretrained
    from ..pretrained import published as published_file

    name, recorded = section.name, {}
    published = published_file(section.weights)  # a tag of `nestvit pretrained`
    weights = resolve_weights(section.weights) if section.weights is not None and published is None else None
    if name is None and published is not None:
        name, recorded = published.model, dict(published.kwargs)
    elif name is None:
        if weights is None:
            raise ContractError("model.name is null but model.weights is not set: name a model (`nestvit models`), "
                                "or give model.weights of a trained run to take its architecture")
        from ..models.nest_variants import legacy_nest_kwargs

        contract = read_contract(weights)
        if contract.kind != "classifier":
            teacher = key.startswith("distill")
            raise ContractError(f"{'distill.teacher_weights' if teacher else 'model.weights'} {weights} holds a "
                                f"{contract.kind} ({contract.model}), not a classifier; "
                                + ("a teacher is" if teacher else "fine-tuning starts from")
                                + " a classifier's weights")
        name, recorded = legacy_nest_kwargs(contract.model, contract.kwargs)  # files of older versions too
        recorded = {k: v for k, v in recorded.items() if k not in data}
    what = {"num_classes": "classes (the head follows the data)", "in_chans": "channel(s) (data.channels)",
            "img_size": "images (data.img_size; an in-memory set: data.pad_to or data.resize_to)"}
    for opt, noun in what.items():  # an override the data contradict: refused here, not a shape error mid-step
        given = section.overrides.get(opt)
        if given is None:
            continue
        if opt == "img_size":
            given, have = ("x".join(map(str, to_2tuple(v))) for v in (given, data[opt]))
        else:
            have = data[opt]
        if given != have:
            raise ContractError(f"{key}.{opt}={given}, but the data give {have} {noun}; drop the override: "
                                "the model is built for the data")
    kwargs: dict[str, Any] = {**recorded, **data, **section.overrides}
    model = create_model(name, **kwargs)
    model.adapt_notes = []
    if published is not None:
        model.adapt_notes = load_pretrained(model, published)
        if classes is not None and adapt:  # ImageNet's classes among the data's (by name or WordNet id)
            _follow_published(model, published, list(classes), name, kwargs)
    elif weights is not None:
        from ..adapt import HEADS

        fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEADS)}  # a new head's rows
        load_weights(model, weights, adapt=adapt, notes=model.adapt_notes)
        if classes is not None:  # a reordering of the head fits any model, a teacher's too
            follow_class_names(model, weights, list(classes), fresh=fresh if adapt else None)
    if section.grad_checkpointing:
        model.set_grad_checkpointing(True)  # a runtime setting: kwargs (what is saved) stay as they are
    return model, kwargs


def _follow_published(model: nn.Module, published: Any, classes: list[str], name: str,
                      kwargs: dict[str, Any]) -> None:
    """Fine-tuning from a published tag on data with some of its ImageNet classes, named by WordNet id (ImageNet's
    folders, Imagenette's): those classes keep their trained head rows, as from any weights that name their
    classes (:func:`follow_class_names`); the others keep the new head's fresh rows."""
    from ..adapt import HEADS
    from ..pretrained import imagenet_classes, load_pretrained
    from ..registry import create_model

    if published.labels is None or not set(classes) & set(imagenet_classes()[0]):
        return
    names = list(imagenet_classes()[1])
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(HEADS)}
    if getattr(model, "num_classes", None) == len(names):
        trained, notes = model.state_dict(), model.adapt_notes  # the published head as it is
    else:  # the published head: the same model with ImageNet's 1,000 outputs
        full = create_model(name, **{**kwargs, "num_classes": len(names)})
        notes = load_pretrained(full, published, progress=False)
        trained = full.state_dict()
    if any(n.startswith(("head: re-", "head_dist: re-")) for n in notes):  # the file's head has other outputs
        return
    follow_class_names(model, published.tag, classes, fresh=fresh, recorded=(names, trained))


def follow_class_names(model: nn.Module, weights: str | Path, classes: list[str], *,
                       fresh: dict[str, torch.Tensor] | None = None,
                       recorded: tuple[list[str], dict[str, torch.Tensor]] | None = None) -> None:
    """A head kept from ``weights`` follows the class names its run recorded.

    The same classes in another order (a class list, other folder names' sorting) get their head rows
    reordered to ``classes``. With ``fresh`` (the new head's own rows, fine-tuning), classes the weights had
    keep their rows by name, whatever the class counts, and the others start from ``fresh``; without it (a
    teacher of the same count: it must teach every class) they take the rows of the weights' classes the data
    lack, in order, with a warning. No name in common: rows by position (same count, with a warning). Files that
    record no classes (timm's) keep their rows, as they are. Weights named by ImageNet-1k's classes (published
    ones, or a saved copy) match classes by WordNet id only (ImageNet's folders, Imagenette's): a first lemma
    can name another thing (ImageNet's ``mouse`` is a computer mouse, CIFAR-100's an animal).
    ``recorded``: ``(class names, state dict)`` of the weights instead of reading them from ``weights``.
    """
    from ..adapt import HEADS
    from ..contract import ContractError, read_contract
    from ..data.datasets import same_name
    from ..errors import listed
    from ..interop import read_state_dict
    from ..pretrained import imagenet_classes

    try:
        had = list(recorded[0] if recorded is not None else read_contract(weights).classes or ())
    except ContractError:
        return
    had, classes = [same_name(c) for c in had], [same_name(c) for c in classes]
    ids, names = imagenet_classes()
    if tuple(had) == names:  # ImageNet's classes go by WordNet id: a name can be another thing (a CIFAR mouse)
        had = list(ids)
    if not had or had == classes:
        return
    shown = ", ".join(had[:5]) + (", ..." if len(had) > 5 else "")
    shared = [c for c in classes if c in had]
    new = [c for c in classes if c not in had]
    if not shared:  # nothing in common: a new head for another count (nestvit.adapt made it), else as it is
        if len(had) == len(classes):
            model.adapt_notes.append(f"warning: head kept row by row, though the weights' classes ({shown}) are not "
                                     "this data's: row k, the weights' class k, serves the data's class k")
        return
    # the row each class takes: its own where the weights had it; else a fresh row (fine-tuning) or, for a teacher
    # (it must teach every class; the same count), the rows of the weights' classes the data lack, in order
    spare = iter([k for k, c in enumerate(had) if c not in classes])
    source = {k: had.index(c) if c in had else (None if fresh is not None else next(spare))
              for k, c in enumerate(classes)}
    sd = recorded[1] if recorded is not None else read_state_dict(weights)[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(HEADS) and p.shape[0] == len(classes) and name in sd \
                    and sd[name].shape[0] == len(had) and sd[name].shape[1:] == p.shape[1:]:
                rows = fresh[name].clone() if fresh is not None else p.detach().clone()
                for k, j in source.items():
                    if j is not None:
                        rows[k] = sd[name][j]
                p.copy_(rows)
    if not new:
        if sorted(had) == sorted(classes):
            model.adapt_notes.append(f"head: rows reordered to this data's class order (the weights had the same "
                                     f"classes, ordered {shown})")
        else:
            model.adapt_notes[:] = [n for n in model.adapt_notes if not n.startswith(("head: re-", "head_dist: re-"))]
            model.adapt_notes.append(f"head: {listed(shared, 5)} keep their rows by name (the weights' "
                                     f"{listed([c for c in had if c not in classes], 5)} are dropped)")
    elif fresh is not None:
        model.adapt_notes[:] = [n for n in model.adapt_notes if not n.startswith(("head: re-", "head_dist: re-"))]
        model.adapt_notes.append(f"head: {listed(shared, 5)} keep their rows by name; the new {listed(new, 5)} start "
                                 "fresh")
    else:
        lent = [had[source[classes.index(c)]] for c in new]
        model.adapt_notes.append(f"warning: the weights' classes ({shown}) lack {listed(new, 5)}: "
                                 + ", ".join(f"{c} is served by {h}'s row" for c, h in zip(new[:5], lent))
                                 + (f"; {listed(shared, 5)} by name" if shared else ""))


def input_transform(data: DataSection, *, channels: int, size: tuple[int, int],
                    unpadded: tuple[int, int] | None) -> InputTransform:
    """How the run prepared its images: in-memory sets are resized (``resize_to``) and zero-padded (``pad_to``),
    image folders resized and centre-cropped."""
    folder = data.name in DATASETS and not DATASETS[data.name].in_memory
    return InputTransform(channels=channels, size=tuple(size), mean=tuple(data.mean), std=tuple(data.std),
                          resize="center-crop" if folder else "stretch",
                          content=tuple(unpadded) if data.pad_to and unpadded and not folder else None)


def run_contract(model_name: str, model_kwargs: dict[str, Any], *, classes: list[str], transform: InputTransform,
                 **info: Any) -> RunContract:
    """The contract written into every weights file of a run (``info``: data set, epoch, step, top-1)."""
    return RunContract(model=model_name, kwargs=dict(model_kwargs), kind="classifier", classes=tuple(classes),
                       transform=transform, info={k: v for k, v in info.items() if v is not None})
