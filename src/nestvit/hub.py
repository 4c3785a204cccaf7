"""Share a trained model in the layout the Hugging Face Hub and timm use, and load it back.

    nestvit.save_pretrained("runs/demo", "shared/demo")   # a run folder, a weights file, a Loaded or a model
    loaded = nestvit.from_pretrained("shared/demo")        # or "hf-hub:org/name" (needs huggingface_hub)
    nestvit.hub.push_to_hub("runs/demo", "org/name")      # needs huggingface_hub and a token

A shared folder holds

- ``config.json``: the run contract as plain JSON (``architecture``: the registry name, ``kwargs``,
  ``kind``, ``classes``, ``input``: the input transform), plus ``library_name: nestvit`` and the version;
- ``model.safetensors``: the weights, with the same contract and a SHA-256 of the tensors in their metadata
  (so the file alone still loads with ``nestvit.load``);
- ``README.md``: a model card filled from the run's ``summary.json`` (accuracy, data, epochs, machine).

``from_pretrained`` returns what ``nestvit.load`` returns: the model in eval mode and its input transform.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from .contract import (
    HUB_PREFIX,
    PRETRAINED_FILE,
    ContractError,
    InputTransform,
    Loaded,
    RunContract,
    head_changed,
    load,
)

__all__ = ["from_pretrained", "push_to_hub", "save_pretrained"]



def _loaded(source: Any) -> Loaded:
    if isinstance(source, Loaded):
        return source
    if isinstance(source, nn.Module):
        return Loaded.of_model(source, Path("(in memory)"))
    return load(source)


def _generator_card(loaded: Loaded, summary: dict[str, Any] | None) -> str:
    c, g = loaded.contract, loaded.model
    lines = ["---", "library_name: nestvit", "pipeline_tag: unconditional-image-generation",
             "tags: [unconditional-image-generation, gan, nested-vision-transformer]", "---", "", f"# {c.model}", "",
             f"A `{c.model}` GAN generator trained with [nestvit](https://pypi.org/project/nestvit/).", ""]
    facts = [("input", f"noise z of shape (B, {g.latent_dim}), standard normal"),
             ("output", f"(B, {g.out_chans}, {g.img_size}, {g.img_size}) images in [-1, 1]")]
    facts += [(key, str(c.info[key])) for key in ("role", "data", "step") if key in c.info]
    ev = (summary or {}).get("eval")
    if isinstance(ev, dict) and "fid" in ev:
        facts.append(("FID / KID / IS", f"{ev['fid']:.2f} / {ev['kid']:.4f} / {ev['is']:.2f} "
                                         f"({ev.get('n')} samples, features {ev.get('feature_net')})"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    lines += ["## Use", "", "```python", "import torch, nestvit",
              'G = nestvit.from_pretrained("THIS_FOLDER_OR_hf-hub:ORG/NAME").model',
              "images = G(torch.randn(16, G.latent_dim))  # in [-1, 1]", "```", "",
              "or `nestvit generate sample THIS_FOLDER -n 64 --out grid.png`.", ""]
    return "\n".join(lines)


def _card(loaded: Loaded, summary: dict[str, Any] | None) -> str:
    from .pretrained import published

    if loaded.contract.kind == "generator":
        return _generator_card(loaded, summary)
    c, t = loaded.contract, loaded.transform
    cfg = loaded.config  # the run it came from: where its weights started, its teacher
    base = str(getattr(getattr(cfg, "model", None), "weights", None) or "")
    lines = ["---", "library_name: nestvit", "pipeline_tag: image-classification",  # the Hub's task and model tree
             *([f"base_model: {base[len(HUB_PREFIX):]}"] if base.startswith(HUB_PREFIX) else []),
             "tags: [image-classification, nested-vision-transformer]", "---", "", f"# {c.model}", "",
             f"A `{c.model}` {c.kind} trained with [nestvit](https://pypi.org/project/nestvit/).", ""]
    facts = [("input", f"{t.channels} x {t.size[0]} x {t.size[1]}, {t.resize}"
                       + (f" (crop_pct {t.crop_pct}, {t.interpolation})" if t.resize == "center-crop" else "")
                       + (f" to {t.content[0]} x {t.content[1]} then zero-padded" if t.content else "")
                       + f", mean {list(t.mean)}, std {list(t.std)}")]
    if c.classes is not None:
        shown = ", ".join(c.classes[:20]) + (", ..." if len(c.classes) > 20 else "")
        facts.append(("classes", f"{len(c.classes)}: {shown}"))
    for key in ("data", "epoch", "step"):
        if key in c.info:
            facts.append((key, str(c.info[key])))
    for label, value in (("fine-tuned from", getattr(getattr(cfg, "model", None), "weights", None)),
                         ("distilled from", getattr(getattr(cfg, "distill", None), "teacher_weights", None))):
        if value:  # a published tag or hf-hub id as it is; a local path by its last part (no private paths)
            shown = value if published(value) is not None or str(value).startswith(HUB_PREFIX) else Path(value).name
            facts.append((label, f"`{shown}`"))
    summary = summary or {}
    split = str(summary.get("test_split") or "its evaluation split").rpartition(":")[2]
    last = summary.get("steps") is not None and summary.get("steps") == c.info.get("step")  # the run's last weights
    ema = loaded.weights.name == "ema.safetensors"  # the EMA of the last weights: its own score in the summary
    top1 = c.info.get("top1", summary.get("ema_top1" if ema else "test_top1") if last else None)
    if isinstance(top1, (int, float)):
        facts.append((f"top-1 on {split} (%)", f"{top1:.2f}"))
    if last and not ema and isinstance(summary.get("test_top1_tta"), (int, float)):
        facts.append((f"top-1 on {split} with TTA (%)", f"{summary['test_top1_tta']:.2f}"))
    if summary:
        for key, label in (("epochs", "epochs of the run"), ("wall_s", "training time (s)"),
                           ("precision", "precision")):
            if summary.get(key) is not None:
                facts.append((label, str(summary[key])))
        machine = summary.get("machine") or {}
        if isinstance(machine, dict) and machine.get("cpu_model"):
            facts.append(("trained on", str(machine["cpu_model"])))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    lines += ["## Use", "", "```python", "import nestvit",
              'loaded = nestvit.from_pretrained("THIS_FOLDER_OR_hf-hub:ORG/NAME")',
              'x = loaded.transform(loaded.transform.read_batch(["image.png"]))',
              "probs = loaded.model(x).softmax(-1)", "```", ""]
    return "\n".join(lines)


def save_pretrained(source: Any, folder: str | Path, *, classes: Sequence[str] | None = None,
                    transform: InputTransform | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` of ``source`` into ``folder``.

    ``source``: a run folder or weights file (``nestvit.load``), a ``Loaded``, or a model from ``create_model``
    (or from ``nestvit.load``: it keeps the file's input transform and class names). ``classes``: the class
    names to record instead (a head changed with ``reset_classifier`` has none of its own). ``transform``: how
    the model's inputs were prepared (``nestvit.InputTransform``), for a model that records none (one you built
    with ``create_model`` and trained yourself); without it such a model is saved as taking images stretched
    to its size and scaled to [-1, 1], with a warning.
    """
    from . import __version__
    from .contract import EXPORTED_SUFFIXES
    from .fileio import atomic_write_text
    from .interop import save_weights

    folder = Path(folder)
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() in EXPORTED_SUFFIXES:
        raise ContractError(f"{source} is an export (its weights are the runtime's, not PyTorch's); give the run "
                            "folder or weights file it was made from")
    if folder.exists() and not folder.is_dir():
        raise ContractError(f"{folder} is a file; save_pretrained writes a folder: give a folder's path")
    loaded = _loaded(source)
    if loaded.weights.suffix.lower() in EXPORTED_SUFFIXES:
        raise ContractError(f"{loaded.weights} is an export; give the run folder or weights file it was made from")
    if transform is None and loaded.contract.transform is None and loaded.contract.kind == "classifier":
        t = loaded.transform
        warnings.warn(f"the model records no input transform: saved as taking images stretched to "
                      f"{t.size[0]}x{t.size[1]} and scaled to [-1, 1] (mean = std = 0.5); if it was trained otherwise, "
                      "pass transform=nestvit.InputTransform(...) (or save the run folder it came from)", stacklevel=2)
    contract = replace(loaded.contract, transform=transform or loaded.contract.transform or loaded.transform)
    # the run's results: beside the weights file (a model in memory has none, whatever the working folder holds)
    summary_file = loaded.weights.parent / "summary.json" if loaded.weights.is_file() else None
    if head_changed(loaded.model):  # reset_classifier since it was built: not the saved model any more
        n, built = loaded.model.num_classes, loaded.model.cfg.num_classes
        if classes is None:
            warnings.warn(f"the model's head is new (reset_classifier: {n} classes, built with {built}): no class "
                          "names are saved for it (pass classes=[...]), nor the results of the run it came from",
                          stacklevel=2)
        contract = replace(contract, kwargs={**contract.kwargs, "num_classes": n}, classes=None,
                           info={k: v for k, v in contract.info.items() if k == "pretrained"})
        summary_file = None
    if classes is not None:
        n = getattr(loaded.model, "num_classes", None)
        if n is not None and len(classes) != n:
            raise ContractError(f"classes: {len(classes)} names for a model of {n} classes")
        contract = replace(contract, classes=tuple(map(str, classes)))
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(loaded.model, folder / PRETRAINED_FILE, contract=contract)
    config = {"library_name": "nestvit", "nestvit_version": __version__, "architecture": contract.model,
              **{k: v for k, v in json.loads(contract.to_json()).items() if k != "model"}}
    config["input"] = config.pop("transform")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    try:
        summary = json.loads(summary_file.read_text()) if summary_file and summary_file.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # the card is written without its results
        warnings.warn(f"{summary_file}: not read ({e}); the model card lists no results", stacklevel=2)
        summary = None
    atomic_write_text(folder / "README.md", _card(replace(loaded, contract=contract, transform=contract.transform),
                                                  summary))
    return folder


def hub_folder(text: str) -> Path:
    """The local copy of ``"hf-hub:org/name"`` (downloaded into Hugging Face's cache, or found there): the
    folder :func:`save_pretrained` wrote. Every command that reads a model takes such an id through
    :func:`nestvit.contract.resolve_weights`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ContractError(f"{text}: loading from the Hugging Face Hub needs huggingface_hub: "
                            "pip install 'nestvit[hub]' (or download the folder and pass its path)") from None
    return Path(snapshot_download(text[len(HUB_PREFIX):], allow_patterns=["config.json", PRETRAINED_FILE,
                                                                          "README.md"]))


def from_pretrained(source: str | Path) -> Loaded:
    """A model shared by :func:`save_pretrained`: a local folder, or ``"hf-hub:org/name"`` from the Hub."""
    text = str(source)
    folder = hub_folder(text) if text.startswith(HUB_PREFIX) else Path(source).expanduser()
    weights = folder / PRETRAINED_FILE if folder.is_dir() else folder
    if not folder.exists():
        raise ContractError(f"{folder}: no such folder (from_pretrained reads a folder written by "
                            "nestvit.save_pretrained, or hf-hub:ORG/NAME)")
    if not weights.is_file():
        raise ContractError(f"{folder}: no model.safetensors; is it a folder written by nestvit.save_pretrained? (a "
                            "run folder or a weights file: nestvit.load(PATH) reads it)")
    loaded = load(weights)
    config_file = weights.parent / "config.json"
    if config_file.is_file():
        try:
            described = contract_from_config(json.loads(config_file.read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ContractError(f"{config_file}: not a config.json written by nestvit.save_pretrained "
                                f"({type(e).__name__}: {e}); download or save the folder again") from None
        if (described.model, described.kwargs) != (loaded.contract.model, loaded.contract.kwargs):
            raise ContractError(f"{config_file} describes {described.model!r} {described.kwargs} but "
                                f"model.safetensors holds {loaded.contract.model!r} {loaded.contract.kwargs}; the "
                                "folder mixes two models")
        edited = [k for k, a, b in (("classes", described.classes, loaded.contract.classes),
                                    ("input", described.transform, loaded.contract.transform)) if a != b]
        if edited:  # the weights' own contract is what every command reads: an edit of config.json is not
            warnings.warn(f"{config_file}'s {' and '.join(edited)} differ from what model.safetensors records, which "
                          "is what nestvit uses; to change them, save the folder again: nestvit.save_pretrained(MODEL, "
                          "DIR, classes=[...], transform=nestvit.InputTransform(...))", stacklevel=2)
    return loaded


def push_to_hub(source: Any, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """``save_pretrained`` into a temporary folder, then upload it to the Hub repo ``repo_id``; returns its URL."""
    import tempfile

    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ContractError("push_to_hub needs huggingface_hub: pip install 'nestvit[hub]'") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(source, tmp)
        api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message="nestvit.save_pretrained")
    return f"https://huggingface.co/{repo_id}"


def contract_from_config(config: dict[str, Any]) -> RunContract:
    """The run contract a ``config.json`` describes (its ``architecture`` is the contract's ``model``)."""
    d = {k: v for k, v in config.items() if k not in ("library_name", "nestvit_version", "architecture", "input")}
    return RunContract.from_json(json.dumps({**d, "model": config["architecture"], "transform": config.get("input")}))
