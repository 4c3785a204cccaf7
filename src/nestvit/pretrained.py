"""Published weights by name: ``list_pretrained`` and ``create_model(name, pretrained=...)``.

Every file here was published by someone else (the papers' authors, timm); nestvit only knows where it
lives, what it is, and how to convert it::

    nestvit.list_pretrained("nest_*")                          # tags, sources, licences, reported top-1
    model = nestvit.create_model("nest_tiny_224", pretrained=True)            # the first tag of that model
    model = nestvit.create_model("nest_tiny_224.official_in1k", pretrained=True)
    model = nestvit.create_model("nest_tiny_224", pretrained=True, num_classes=10)  # head re-initialised

A tag is ``<registered model>.<weights>``. The first use downloads the file, with a progress bar, into the
standard torch hub cache (``torch.hub.get_dir()/checkpoints``, or ``$TORCH_HOME``), checks it, converts it
(timm's layouts and the official Flax checkpoints, ``nestvit.interop`` / ``nestvit.official``) and loads
it; later uses read the cache. Without a connection the error names the URL and the path to put the file
at; ``pretrained=PATH`` takes a file you downloaded yourself.

What the check is depends on what the publisher gives (``list_pretrained`` shows it):

- ``sha256``: the file's SHA-256, in full, or its first hex digits where that is what the publisher put in
  the file name (timm's GitHub releases and DeiT's files: ``jx_nest_tiny-e3428fb9.pth``, the convention
  ``torch.hub`` checks);
- files with no published hash (timm's Hugging Face copies of TNT, the official NesT bucket) are checked
  against the hash the server reports with the file (Hugging Face's ``X-Linked-Etag`` SHA-256, Google Cloud
  Storage's MD5); the SHA-256 of what arrived is written beside the file (``<file>.sha256``) and printed by
  ``nestvit pretrained --download``, so that it can be pinned. A file of such an entry that you put in the
  cache by hand is taken as it is (its SHA-256 is recorded, not checked).

Weights of another number of classes, image size or channel count adapt (``nestvit.adapt``): a fine-tuning
model is ``create_model(tag, pretrained=True, num_classes=N, img_size=S)``; ``model.adapt_notes`` lists what
changed. The model records the tag and its input transform (ImageNet's mean/std, centre crop), so weights
saved from it carry both.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .errors import UserError

if TYPE_CHECKING:
    from .contract import Interpolation

__all__ = ["PretrainedFile", "PretrainedError", "download", "imagenet_classes", "list_pretrained", "load_pretrained",
           "published", "resolve"]

log = logging.getLogger("nestvit")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PretrainedError(UserError):
    """A tag that does not exist, a download that failed, or a file that is not what was published."""


@dataclass(frozen=True)
class PretrainedFile:
    """One published weights file and what nestvit knows about it."""

    tag: str  # "<registered model>.<weights>"
    url: str  # the file; with ``listing=True`` a Google Cloud Storage listing whose newest ``ckpt.N`` is the file
    filename: str  # its name in the cache
    layout: Literal["timm", "official"]  # timm's state dict names (NesT, TNT, DeiT) or an official Flax checkpoint
    source: str  # who published it
    license: str
    top1: float  # ImageNet-1k validation top-1 %, as its publisher reports it
    reported: str  # where that number is published
    sha256: str | None = None  # the SHA-256 (or its first hex digits, as published in the file name); None: none
    kwargs: dict[str, Any] = field(default_factory=dict)  # model options the weights need beyond the defaults
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875  # evaluation: resize the shorter side to 224 / crop_pct, centre-crop 224
    interpolation: Interpolation = "bicubic"  # that resize's filter (timm's data config)
    listing: bool = False
    labels: Literal["imagenet-1k"] | None = "imagenet-1k"  # what its outputs are (None: numbered only)

    @property
    def model(self) -> str:
        return self.tag.split(".", 1)[0]

    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename

    def transform(self, model: nn.Module):
        from .contract import InputTransform

        c = int(model.in_chans)
        mean, std = self.mean, self.std
        if len(mean) != c:  # weights adapted to other channels (nestvit.adapt): the channels' average, for each
            mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
        size = tuple(model.img_size)
        if size[0] != size[1]:  # adapted to a non-square input: the centre crop is square, so stretch to it
            return InputTransform(channels=c, size=size, mean=mean, std=std, resize="stretch")
        return InputTransform(channels=c, size=size, mean=mean, std=std, resize="center-crop",
                              crop_pct=self.crop_pct, interpolation=self.interpolation)


    def class_names(self, model: nn.Module) -> tuple[str, ...] | None:
        """The names of ``model``'s outputs when its head is the published one (``imagenet_classes``), else None
        (a head adapted to another class count is new: its classes are the data's it is trained on)."""
        if self.labels is None:
            return None
        names = imagenet_classes()[1]
        return names if int(getattr(model, "num_classes", 0)) == len(names) else None


@functools.cache
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(WordNet ids, names)`` of the 1,000 ImageNet-1k classes in output order: the ids sorted (``n01440764``,
    the class folders of ImageNet's own layout), the names readable (``tench``): each synset's first WordNet lemma,
    the two that share one told apart (``crane (bird)`` / ``crane (machine)``, ``maillot`` / ``tank suit``)."""
    rows = [line.split("\t") for line in (Path(__file__).parent / "imagenet_classes.tsv").read_text(
        encoding="utf-8").splitlines() if line and not line.startswith("#")]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vt3p-weights/"
_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_DEIT = "https://dl.fbaipublicfiles.com/deit/"
_GCS = "https://storage.googleapis.com/storage/v1/b/gresearch/o?prefix=nest-checkpoints/{}/"
_NEST_README = "google-research/nested-transformer README (JAX weights; timm's port is of the same weights)"
_TNT_PAPER = "TNT paper, Table 3 (Han et al. 2021)"
_TNT_SOURCE = "timm (Huawei's TNT weights, huawei-noah/Efficient-AI-Backbones)"
_DEIT_PAPER = "DeiT paper, Table 5 (Touvron et al. 2021)"

PUBLISHED: tuple[PretrainedFile, ...] = (
    # NesT, ported from the official JAX weights by timm (exact GELU; timm's GitHub release, hash in the name)
    PretrainedFile("nest_tiny_224.jx_in1k", _TIMM_RELEASE + "jx_nest_tiny-e3428fb9.pth", "jx_nest_tiny-e3428fb9.pth",
                   "timm", "timm (Alexander Soare's port of the official weights)", "apache-2.0", 81.5, _NEST_README,
                   sha256="e3428fb9"),
    PretrainedFile("nest_small_224.jx_in1k", _TIMM_RELEASE + "jx_nest_small-422eaded.pth",
                   "jx_nest_small-422eaded.pth", "timm", "timm (Alexander Soare's port of the official weights)",
                   "apache-2.0", 83.3, _NEST_README, sha256="422eaded"),
    PretrainedFile("nest_base_224.jx_in1k", _TIMM_RELEASE + "jx_nest_base-8bc41011.pth", "jx_nest_base-8bc41011.pth",
                   "timm", "timm (Alexander Soare's port of the official weights)", "apache-2.0", 83.8, _NEST_README,
                   sha256="8bc41011"),
    # NesT, the official Flax checkpoints (optimizer/target; tanh GELU, as the official code computes)
    PretrainedFile("nest_tiny_224.official_in1k", _GCS.format("nest-t_imagenet"), "nest-t_imagenet.flax", "official",
                   "google-research/nested-transformer (gs://gresearch/nest-checkpoints/nest-t_imagenet)",
                   "apache-2.0", 81.5, _NEST_README, kwargs={"act": "gelu_tanh"}, listing=True),
    PretrainedFile("nest_small_224.official_in1k", _GCS.format("nest-s_imagenet"), "nest-s_imagenet.flax", "official",
                   "google-research/nested-transformer (gs://gresearch/nest-checkpoints/nest-s_imagenet)",
                   "apache-2.0", 83.3, _NEST_README, kwargs={"act": "gelu_tanh"}, listing=True),
    PretrainedFile("nest_base_224.official_in1k", _GCS.format("nest-b_imagenet"), "nest-b_imagenet.flax", "official",
                   "google-research/nested-transformer (gs://gresearch/nest-checkpoints/nest-b_imagenet)",
                   "apache-2.0", 83.8, _NEST_README, kwargs={"act": "gelu_tanh"}, listing=True),
    # TNT: Huawei's weights in timm's (non-legacy) layout, from timm's Hugging Face repositories
    PretrainedFile("tnt_s_patch16_224.in1k", _HF.format("tnt_s_patch16_224.in1k"),
                   "timm-tnt_s_patch16_224.in1k.safetensors", "timm", _TNT_SOURCE, "apache-2.0", 81.5,
                   _TNT_PAPER, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9),
    PretrainedFile("tnt_b_patch16_224.in1k", _HF.format("tnt_b_patch16_224.in1k"),
                   "timm-tnt_b_patch16_224.in1k.safetensors", "timm", _TNT_SOURCE, "apache-2.0", 82.9,
                   _TNT_PAPER, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9),
    # DeiT (facebookresearch/deit): the hash's first digits are in the file name
    PretrainedFile("deit_tiny_patch16_224.fb_in1k", _DEIT + "deit_tiny_patch16_224-a1311bcf.pth",
                   "deit_tiny_patch16_224-a1311bcf.pth", "timm", "facebookresearch/deit", "apache-2.0", 72.2,
                   _DEIT_PAPER, sha256="a1311bcf"),
    PretrainedFile("deit_small_patch16_224.fb_in1k", _DEIT + "deit_small_patch16_224-cd65a155.pth",
                   "deit_small_patch16_224-cd65a155.pth", "timm", "facebookresearch/deit", "apache-2.0", 79.8,
                   _DEIT_PAPER, sha256="cd65a15597004d0ce19d7a9daef969903972db5b398e3a5febcd3c4df1d8f59f"),
    PretrainedFile("deit_base_patch16_224.fb_in1k", _DEIT + "deit_base_patch16_224-b5f2ef4d.pth",
                   "deit_base_patch16_224-b5f2ef4d.pth", "timm", "facebookresearch/deit", "apache-2.0", 81.8,
                   _DEIT_PAPER, sha256="b5f2ef4d"),
)


def list_pretrained(pattern: str = "*") -> list[PretrainedFile]:
    """Published weights whose tag (``nest_tiny_224.jx_in1k``) matches a shell pattern, in the listed order."""
    return [p for p in PUBLISHED if fnmatch.fnmatch(p.tag, pattern) or fnmatch.fnmatch(p.model, pattern)]


def published(tag: str | None) -> PretrainedFile | None:
    """The published file of exactly this tag (``nest_tiny_224.jx_in1k``), else None (a path, a run, nothing)."""
    return next((p for p in PUBLISHED if p.tag == tag), None)


def resolve(name: str, pretrained: Any = True) -> tuple[str, PretrainedFile | None, Path | None]:
    """``(model name, published file or None, local file or None)`` for ``create_model(name, pretrained=...)``.

    ``name`` is a model (``nest_tiny_224``) or a tag (``nest_tiny_224.jx_in1k``); ``pretrained`` is True (the
    tag in ``name``, else the model's first published file), a tag or its part after the dot, a file, or a run
    or ``save_pretrained`` folder (local or ``hf-hub:org/name``: its weights file).
    """
    model, _, wanted = name.partition(".")
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        text = str(pretrained)
        suffixes = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".flax")
        from .contract import HUB_PREFIX, resolve_weights

        if text.startswith(HUB_PREFIX) or Path(text).expanduser().is_dir():  # a run or save_pretrained folder
            return model, None, resolve_weights(text)  # (it expands "~" and fetches hf-hub: ids)
        if os.sep in text or Path(text).suffix in suffixes or Path(text).exists():
            path = Path(text).expanduser()
            if not path.is_file():
                raise PretrainedError(f"pretrained={text!r}: no such file or folder")
            return model, None, path
        wanted = text.split(".", 1)[1] if text.startswith(model + ".") else text
    elif pretrained is not True:
        raise PretrainedError(f"pretrained must be True, a tag or a file path, not {pretrained!r}")
    files = [p for p in PUBLISHED if p.model == model]
    if wanted:
        files = [p for p in files if p.tag == f"{model}.{wanted}"]
    if not files:
        known = [p.tag for p in PUBLISHED if p.model == model] or [p.tag for p in PUBLISHED]
        what = f"{model}.{wanted}" if wanted else model
        raise PretrainedError(f"no published weights for {what!r}; published: {', '.join(known)} "
                              "(`nestvit pretrained` lists them all)")
    return model, files[0], None


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------

def _fail(entry: PretrainedFile, url: str, reason: str) -> PretrainedError:
    what = "it" if not (entry.listing and url == entry.url) else ("the newest ckpt.N file it lists (a JSON listing "
                                                                  "of the bucket: that item's mediaLink)")
    return PretrainedError(f"cannot download {entry.tag} from {url} ({reason}). Fetch {what} with a browser or "
                           f"curl and save it as {entry.cache_path()}: the tag then loads from there, as "
                           f"--set model.weights={entry.tag} and in Python (or pass the file in Python: "
                           f"create_model({entry.model!r}, pretrained='path/to/{entry.filename}'))")


def _open(entry: PretrainedFile, url: str):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "nestvit"}), timeout=60)
    except urllib.error.HTTPError as e:
        raise _fail(entry, url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _fail(entry, url, f"no connection: {getattr(e, 'reason', e)}") from None


def _newest_checkpoint(entry: PretrainedFile) -> tuple[str, str | None]:
    """``(download URL, base64 MD5)`` of the newest Flax checkpoint (``ckpt.N``, ``ckpt-N.flax``) in a Google
    Cloud Storage listing (the JSON API's ``items``: ``name``, ``mediaLink``, ``md5Hash``)."""
    import re

    with _open(entry, entry.url) as r:
        try:
            items = json.loads(r.read().decode()).get("items", [])
        except ValueError:
            raise _fail(entry, entry.url, "the listing is not JSON") from None
    ckpts = []
    for item in items:
        found = re.search(r"(?:^|/)ckpt[.-](\d+)(?:\.flax)?$", str(item.get("name", "")))
        if found and item.get("mediaLink"):
            ckpts.append((int(found.group(1)), item))
    if not ckpts:
        raise _fail(entry, entry.url, "the listing holds no checkpoint (ckpt.N or ckpt-N.flax)")
    item = max(ckpts, key=lambda c: c[0])[1]
    return str(item["mediaLink"]), item.get("md5Hash")


def _server_hash(headers: Mapping[str, str]) -> str | None:
    """The SHA-256 Hugging Face reports for a large file (``X-Linked-Etag``), if there is one (``headers``: names
    in lower case, as ``fileio.Fetched`` has them)."""
    tag = (headers.get("x-linked-etag") or headers.get("etag") or "").strip('"').removeprefix("W/").strip('"')
    return tag.lower() if len(tag) == 64 and all(c in "0123456789abcdefABCDEF" for c in tag) else None


def _check(entry: PretrainedFile, digest: str, *, server_sha256: str | None = None, md5: tuple[str, str] | None = None,
           where: str) -> None:
    if entry.sha256 is not None and not digest.startswith(entry.sha256.lower()):
        raise PretrainedError(f"{where}: SHA-256 {digest} does not match the published {entry.sha256} of "
                              f"{entry.tag}; the file is damaged or not the published one (delete it and retry)")
    if server_sha256 is not None and digest != server_sha256:
        raise PretrainedError(f"{where}: SHA-256 {digest} does not match the {server_sha256} the server reported; "
                              "the download is damaged (retry)")
    if md5 is not None and md5[0] != md5[1]:
        raise PretrainedError(f"{where}: MD5 {md5[0]} does not match the {md5[1]} the server reported; the download "
                              "is damaged (retry)")


def download(entry: PretrainedFile, *, progress: bool = True) -> Path:
    """The published file in the cache: downloaded (progress bar, temporary file, then rename) and checked.

    A file already in the cache is checked once against the published hash (a file put there by hand
    included); ``<file>.sha256`` beside it records the SHA-256 that passed.
    """
    import base64

    from .data.download import sha256_file
    from .fileio import Fetched, FetchError, atomic_write_text, fetch_url

    path = entry.cache_path()
    stamp = path.with_name(path.name + ".sha256")
    if path.is_file():
        if not stamp.is_file():
            digest = sha256_file(path)
            _check(entry, digest, where=str(path))
            atomic_write_text(stamp, digest + "\n")
        return path
    url, md5_expected = _newest_checkpoint(entry) if entry.listing else (entry.url, None)

    def check(fetched: Fetched) -> None:  # before the file takes its name in the cache
        md5 = base64.b64encode(bytes.fromhex(fetched.md5)).decode()
        _check(entry, fetched.sha256, server_sha256=_server_hash(fetched.headers), where=url,
               md5=None if md5_expected is None else (md5, md5_expected))

    try:
        digest = fetch_url(url, path, check=check, progress=progress, user_agent="nestvit").sha256
    except FetchError as e:
        raise _fail(entry, url, e.reason) from None
    atomic_write_text(stamp, digest + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Converting and loading
# --------------------------------------------------------------------------------------------------

def load_pretrained(model: nn.Module, source: PretrainedFile | Path, *, progress: bool = True) -> list[str]:
    """Load published weights (or a file in a published layout) into ``model``, adapting what differs.

    Returns what was adapted (``nestvit.adapt``): a new head, resampled position embeddings, a first conv for
    another channel count.
    """
    from .adapt import adapt_state_dict
    from .interop import load_state_strict, load_weights

    path = download(source, progress=progress) if isinstance(source, PretrainedFile) else Path(source)
    notes: list[str] = []
    layout = source.layout if isinstance(source, PretrainedFile) else _layout(path)
    if layout == "official":
        import dataclasses

        from .official import nest_state_from_official, read_official_checkpoint

        params = read_official_checkpoint(path)
        classes = params["Dense_0/kernel"].shape[1] if "Dense_0/kernel" in params else 0
        cfg = dataclasses.replace(model.cfg, num_classes=classes)  # the file's head; adapted below
        sd, notes = adapt_state_dict(model, nest_state_from_official(params, cfg))
        load_state_strict(model, sd, source=str(path))
    else:
        load_weights(model, path, adapt=True, notes=notes, timm=isinstance(source, PretrainedFile))
    for note in notes:
        log.info("pretrained: %s", note)
    return notes


def _layout(path: Path) -> str:
    """A local file's layout: an official Flax checkpoint (a msgpack map) or a state dict (timm's or nestvit's)."""
    import zipfile

    from .interop import _is_safetensors

    if _is_safetensors(path) or zipfile.is_zipfile(path):
        return "timm"
    with open(path, "rb") as f:
        head = f.read(2)
    # msgpack: a map of 1-15 keys (0x81-0x8f) or map16/map32; a legacy torch.save pickle starts 0x80 0x02
    return "official" if head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)) else "timm"


# --------------------------------------------------------------------------------------------------
# nestvit pretrained [PATTERN] [--download] [--json]
# --------------------------------------------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    parser.add_argument("pattern", nargs="?", default="*",
                        help="shell pattern of tags or model names, e.g. 'nest_*' (default: all)")
    parser.add_argument("--download", action="store_true",
                        help="download (or find in the cache) and check every matching file; print its path and "
                             "SHA-256")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _short(sha256: str | None) -> str:
    if sha256 is None:
        return "(server's)"
    return sha256 if len(sha256) <= 16 else sha256[:16] + "..."


def run(args: Any) -> int:
    files = list_pretrained(args.pattern)
    if not files:
        raise PretrainedError(f"no published weights match {args.pattern!r}; `nestvit pretrained` lists them all")
    if args.download:
        for entry in files:
            path = download(entry)
            digest = path.with_name(path.name + ".sha256").read_text().strip()
            print(f"{entry.tag}: {path} sha256 {digest}")
        return 0
    rows = [{"tag": p.tag, "top1": p.top1, "license": p.license, "sha256": p.sha256, "source": p.source,
             "url": p.url, "reported": p.reported, "cached": p.cache_path().is_file()} for p in files]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("tag", "top-1 %", "license", "sha256", "cached", "source")
    cells = [(r["tag"], f"{r['top1']:.1f}", r["license"], _short(r["sha256"]), "yes" if r["cached"] else "",
              r["source"]) for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\ntop-1: ImageNet-1k validation, as the publisher reports it (`--json` names where); sha256: the "
          "published hash (8 digits: the prefix in the file name), or checked against the server's\n"
          "use: nestvit.create_model(TAG, pretrained=True); fine-tune: nestvit train finetune --set model.weights=TAG")
    return 0
