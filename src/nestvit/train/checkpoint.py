"""Run-directory checkpoints that survive a kill and resume bit-exactly.

A run directory holds:

- ``state.pt``: everything needed to continue (model, EMA, optimizer, GradScaler, RNG states of
  torch / CUDA / numpy / Python / the augmentation generators, step, epoch, best accuracy, config).
  Written with ``torch.save`` to a temporary file that is then renamed over the old one
  (``os.replace`` is atomic), so a run killed at any moment leaves the previous good state. It
  holds only tensors and plain containers and is read with ``torch.load(weights_only=True)``, which
  never unpickles code.
- ``last.safetensors``, ``best.safetensors``, ``ema.safetensors``: the weights alone, through
  ``nestvit.interop.save_weights`` (also atomic), with metadata that tells ``nestvit eval`` and
  ``nestvit predict`` which model to build and how to normalise its input.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_path

STATE_FILE = "state.pt"


class CheckpointError(UserError, RuntimeError):
    """A training state that cannot be read (truncated, damaged, or not a nestvit ``state.pt``)."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename it over ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a ``state.pt`` (or a run directory holding one) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from (a run directory holds {STATE_FILE} "
                                "after its first checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one clear message for any unreadable file
        raise CheckpointError(f"{path}: cannot read the training state ({type(e).__name__}: {e}); is the file "
                              "truncated? Start a new run with another --out") from None


# --------------------------------------------------------------------------------------------------
# RNG states as tensors and lists (what weights_only=True can read back)
# --------------------------------------------------------------------------------------------------

def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy, Python and the given generators."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])
