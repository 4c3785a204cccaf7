"""``nestvit export RUN --format onnx|pt2``: a trained model as an ONNX file or a ``torch.export`` program.

    nestvit export runs/demo --format onnx            # runs/demo/model.onnx, dynamic batch, checked
    nestvit export runs/demo --format pt2 --out m.pt2 # a torch.export program (torch.export.load)
    nestvit export runs/gan                           # a GAN run: runs/gan/generator.onnx, z -> images

The model and its input transform come from the run contract (``nestvit.load``). The exported graph
takes the *normalised* input ``(B, C, H, W)`` float32 (the transform's ``__call__`` does that step) and
returns the logits; the batch size is dynamic. The contract is stored with it (ONNX ``metadata_props``
key ``nestvit.contract``; a ``nestvit.contract.json`` extra file in the ``.pt2`` archive). After writing,
the export is run on a batch of 2 and a batch of 3 random inputs and compared with the PyTorch model:
with onnxruntime for ONNX (``pip install 'nestvit[export]'``), with ``torch.export.load`` for pt2; the
largest difference is printed, and an export that disagrees beyond ``--atol`` is an error. A GAN run exports
its EMA generator the same way: input ``z`` ``(B, latent_dim)``, output ``images`` ``(B, C, H, W)`` in [-1, 1].
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from .cli_args import add_threads, nonnegative_float, note_weights_of_a_file, positive_int, writable_dir
from .contract import CONTRACT_KEY  # the ONNX metadata key of the contract; ".json" added: the .pt2 file

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory (classifier or GAN), a save_pretrained folder (or "
                             "hf-hub:org/name, exported into the current folder), or a weights file written by nestvit")
    parser.add_argument("--format", choices=list(FORMATS), default=None,
                        help="onnx or pt2 (default: the --out file's suffix, else onnx)")
    parser.add_argument("--out", type=Path, help="output file (default: model.onnx / model.pt2, a GAN run: "
                                                 "generator.onnx / .pt2, beside the weights; a weights file of "
                                                 "another name: NAME.onnx)")
    parser.add_argument("--weights", default=None, help="which weights of a run directory (best, last, ema; a GAN run: "
                                                          "ema, raw)")
    parser.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--atol", type=nonnegative_float, default=1e-4,
                        help="largest difference allowed in the check (1e-4)")
    parser.add_argument("--no-check", action="store_true", help="write only, do not run the export to check it")
    add_threads(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _inputs(transform, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, transform.channels, *transform.size, generator=g)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, *, contract_json: str,
                opset: int | None = None, names: tuple[str, str] = ("images", "logits")) -> Path:
    """ONNX with a dynamic batch, the contract in its metadata, ``names`` its input and output; written
    atomically. Traced inside :func:`for_export` (the batch-size-dependent CPU speed rules off)."""
    import onnx

    from .fileio import atomic_path

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise ValueError(f"--opset {opset}: the installed onnx knows opsets up to {newest}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = _two(example)
    kwargs = {"opset_version": opset} if opset else {}
    with atomic_path(path) as tmp, _quiet_exporter(), for_export():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                                    input_names=[names[0]], output_names=[names[1]], **kwargs)
        proto = program.model_proto
        wrote = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset and wrote != opset:  # the exporter falls back to its own opset when a conversion fails
            raise ValueError(f"--opset {opset}: this model cannot be converted to it (the exporter's own opset is "
                             f"{wrote}); leave --opset out, or try another")
        entry = proto.metadata_props.add()
        entry.key, entry.value = CONTRACT_KEY, contract_json
        onnx.save(proto, str(tmp))
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Without the exporter's notes that say nothing about this model ("torchvision is not installed. Skipping
    torchvision::nms", deprecation warnings of its own internals); its errors still show."""
    # and without the traceback of a failed opset conversion, which export_onnx reports in one line
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._compat",
             "onnxscript.version_converter")
    logs = [logging.getLogger(name) for name in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def ort_session(path: str | Path):
    """An onnxruntime CPU session of ``path`` with torch's thread count (``--threads``: onnxruntime's own default
    takes every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, model: torch.nn.Module, inputs: list[torch.Tensor]) -> float | None:
    """Largest |onnxruntime - torch| over ``inputs``; None when onnxruntime is not installed."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        session = ort_session(path)
    except ImportError:  # installed but broken (a missing shared library): as if it were not there
        return None
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        worst = max(worst, float((got - want).abs().max()))
    return worst


def _two(example: torch.Tensor) -> torch.Tensor:
    """An example batch of at least 2: a batch of 1 makes the exporter fix the batch at 1 (its 0/1 rule)."""
    return example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: Path, *, contract_json: str) -> Path:
    """A ``torch.export`` program with a dynamic batch (up to 4,096) and the contract as an extra file, written to
    ``path`` itself (``nestvit export`` writes it into a temporary folder under its final name, moved after the
    check: the archive's root folder is named after the file). Traced inside :func:`for_export`."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with for_export():
        program = torch.export.export(model, (_two(example),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={f"{CONTRACT_KEY}.json": contract_json})
    return path


def check_pt2(path: Path, model: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    program = torch.export.load(str(path))
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            worst = max(worst, float((program.module()(x) - model(x)).abs().max()))
    return worst


class OnnxModel(torch.nn.Module):
    """An exported ONNX file as a module: normalised ``(B, C, H, W)`` float32 -> logits ``(B, classes)``, run by
    onnxruntime on the CPU (the output goes back to the input's device)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(path)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        chans, *size = first.shape[1:]  # (batch, C, H, W): the batch is dynamic, the rest fixed
        self.in_chans = chans if isinstance(chans, int) else None
        self.img_size = tuple(size) if all(isinstance(v, int) for v in size) else None
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])  # the logits' width (fixed; batch is not)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .layers import check_images

        check_images(x, f"the exported model {self.path.name}", self.in_chans, self.img_size)  # as the module would
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def exported_contract(path: str | Path):
    """The run contract stored in an ONNX file of ``nestvit export`` (its metadata alone is read). A ``.pt2``
    program is refused: reading one (``torch.export.load``) may unpickle, so it is for files you trust, in
    Python."""
    from .contract import ContractError, RunContract

    path = Path(path)
    if path.suffix == FORMATS["pt2"]:
        raise ContractError(f"{path}: a torch.export program is read by torch.export.load, which may unpickle; "
                            "load it yourself if you trust it, or give the run folder or an .onnx export")
    if not path.is_file():
        raise ContractError(f"{path}: no such ONNX file")
    try:
        import onnx
    except ImportError:
        raise ContractError(f"{path}: reading an ONNX file needs onnx: pip install 'nestvit[export]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others for a file that is not a model
        raise ContractError(f"{path}: not an ONNX model ({type(e).__name__}); export it again with nestvit "
                            "export") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONTRACT_KEY not in meta:
        raise ContractError(f"{path}: records no nestvit run contract (it was not written by nestvit export)")
    return RunContract.from_json(meta[CONTRACT_KEY], source=str(path))


def load_exported(path: str | Path):
    """An ONNX file written by ``nestvit export`` as a :class:`nestvit.contract.Loaded` (its model an
    :class:`OnnxModel`, its transform and classes from the contract in the file), for ``predict`` and ``eval``:
    what is shipped is checked with the same commands as the run."""
    from .contract import ContractError, Loaded, _run_config

    path = Path(path)
    contract = exported_contract(path)
    if contract.kind == "generator":
        raise ContractError(f"{path} holds a generator ({contract.model}): run it with onnxruntime, input 'z' "
                            "(B, latent_dim) standard normal noise, output 'images' in [-1, 1]; the commands that "
                            "sample and measure generators read its run folder")
    if contract.kind != "classifier" or contract.transform is None:
        raise ContractError(f"{path}: its contract has no classifier input transform; export the run again")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ContractError(f"{path}: running an ONNX file needs onnxruntime: pip install 'nestvit[export]'") \
            from None
    # beside its run's config.yaml (the default --out), eval finds the run's data as for the run's weights
    return Loaded(model=OnnxModel(path), transform=contract.transform, contract=contract, weights=path,
                  config=_run_config(path, "classifier"))


@contextlib.contextmanager
def for_export() -> Iterator[None]:
    """The models as ``torch.export`` / ONNX should trace them, with a dynamic batch: the CPU speed rules of eager
    runs (NesT's chunking into groups of images, the explicit attention of short sequences) depend on the
    batch size and would fix it in the graph, so they are off inside (the same function, other kernels)::

        with for_export():  # from nestvit.export import for_export
            program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    """
    from .layers import attention_kernel
    from .models.nest import set_cpu_chunk_tokens

    with set_cpu_chunk_tokens(0), attention_kernel("sdpa"):
        yield


def run(args: argparse.Namespace) -> int:
    with for_export():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .contract import (
        CLASSIFIER_WEIGHTS,
        EXPORTED_SUFFIXES,
        GAN_WEIGHTS,
        HUB_PREFIX,
        PRETRAINED_FILE,
        load,
        published_tag,
    )

    if Path(args.checkpoint).suffix.lower() in EXPORTED_SUFFIXES:
        raise ValueError(f"{args.checkpoint} is an export already; export the run folder or weights file it was "
                         "made from")
    loaded = load(args.checkpoint, note_weights_of_a_file(args.checkpoint, args.weights))
    kind = loaded.contract.kind
    if kind not in ("classifier", "generator"):
        raise ValueError(f"{loaded.weights} holds a {kind}; export takes classifiers and generators (a GAN run: "
                         "--weights ema or raw)")
    model = loaded.model.eval()
    raw = kind == "generator" and loaded.contract.info.get("role") == "generator"  # not the EMA generator
    stem = ("generator_raw" if raw else "generator") if kind == "generator" else "model"
    runs_names = {*CLASSIFIER_WEIGHTS, *GAN_WEIGHTS.values(), Path(PRETRAINED_FILE).stem}
    if Path(args.checkpoint).is_file() and loaded.weights.stem not in runs_names:
        stem = loaded.weights.stem  # a weights file of the user's name: its export beside it, of that name
    elif published_tag(args.checkpoint) is not None:
        stem = str(args.checkpoint)  # nest_tiny_224.jx_in1k.onnx in the current folder
    cached = str(args.checkpoint).startswith(HUB_PREFIX) or published_tag(args.checkpoint) is not None
    beside = Path.cwd() if cached else loaded.weights.parent  # not in a download cache
    suffix = args.out.suffix.lower() if args.out is not None else ""
    args.format = args.format or next((f for f, s in FORMATS.items() if s == suffix), "onnx")
    out = args.out or beside / f"{stem}{FORMATS[args.format]}"
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as {out / (stem + FORMATS[args.format])}")
    if out.suffix.lower() != FORMATS[args.format]:  # a .txt (or .pt2) written over with ONNX bytes: refused
        raise ValueError(f"--out {out}: {args.format} exports are {FORMATS[args.format]} files; name it "
                         f"{out.with_suffix(FORMATS[args.format]).name}")
    replaced = out.exists()
    writable_dir(out.parent)  # before the export and its check
    if kind == "generator":  # noise z (B, latent_dim) -> images (B, C, H, W) in [-1, 1]
        def inputs(batch: int, seed: int) -> torch.Tensor:
            return torch.randn(batch, model.latent_dim, generator=torch.Generator().manual_seed(seed))

        names = ("z", "images")
        contract_json = loaded.contract.to_json()
        shapes = (f"input z (B, {model.latent_dim}) standard normal, output (B, {model.out_chans}, {model.img_size}, "
                  f"{model.img_size}) images in [-1, 1]")
    else:  # normalised images -> logits
        def inputs(batch: int, seed: int) -> torch.Tensor:
            return _inputs(loaded.transform, batch, seed)

        names = ("images", "logits")
        contract_json = replace(loaded.contract, transform=loaded.transform).to_json()  # the transform checked with
        shapes = (f"input (B, {loaded.transform.channels}, {loaded.transform.size[0]}, {loaded.transform.size[1]}) "
                  "normalised")
    example = inputs(2, 0)
    checks = [inputs(2, 1), inputs(3, 2)]  # two batch sizes: the batch is dynamic
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("ONNX export needs the onnx and onnxscript packages: pip install 'nestvit[export]'") \
                from None
    # written in a temporary folder beside it under its own name (a .pt2 archive's root folder is named after the
    # file) and checked there: only an export that passed its check takes the place
    import shutil

    staging = out.with_name(f".{out.name}.unchecked")
    staging.mkdir(exist_ok=True)
    unchecked = staging / out.name
    try:
        if args.format == "onnx":
            export_onnx(model, example, unchecked, contract_json=contract_json, opset=args.opset, names=names)
            worst = None if args.no_check else check_onnx(unchecked, model, checks)
            how = "onnxruntime"
            if worst is None and not args.no_check:
                print("note: onnxruntime is not installed, so the export was not run; pip install 'nestvit[export]'",
                      file=sys.stderr)
        else:
            export_pt2(model, example, unchecked, contract_json=contract_json)
            worst = None if args.no_check else check_pt2(unchecked, model, checks)
            how = "torch.export.load"
        if worst is not None and not worst <= args.atol:
            raise RuntimeError(f"the {args.format} export of {loaded.weights} differs from the PyTorch model by "
                               f"{worst:.3g} (> --atol {args.atol:g}); nothing was written to {out}. Please report "
                               "it as a bug")
        unchecked.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = out.stat().st_size / 1e6
    check = f"; checked with {how} on batches of 2 and 3: max |difference| {worst:.2e}" if worst is not None else ""
    print(f"wrote {out}{' (replacing the file there)' if replaced else ''} ({size:.1f} MB, {args.format}, "
          f"{shapes}{check}) from {loaded.describe()}")
    return 0
