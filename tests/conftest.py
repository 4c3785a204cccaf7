"""Shared test helpers: small configurations of every registered model keep the suite fast."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import nestvit
from nestvit.registry import model_family

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# nestvit's caches (the shard index) in a folder of the test session, not the user's ~/.cache
os.environ["NESTVIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="nestvit-test-cache-")

# timm's conformance files: ../shared/golden beside the project root (as in CI), or $NESTVIT_GOLDEN_DIR
GOLDEN = Path(os.environ.get("NESTVIT_GOLDEN_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "golden")


@pytest.fixture
def model_device() -> torch.device:
    """Where tests/test_models.py's forward/backward and compile tests run: cpu, or $NESTVIT_TEST_DEVICE
    (scripts/gpu_check.sh sets cuda)."""
    device = torch.device(os.environ.get("NESTVIT_TEST_DEVICE") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"NESTVIT_TEST_DEVICE={device} but torch sees no CUDA device")
    return device


@pytest.fixture
def one_thread():
    """Keep a test on one thread: float sums then do not depend on the machine's load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_overrides(name: str) -> dict:
    """Overrides that shrink a registered model to a few thousand parameters, same structure."""
    family = model_family(name)
    if family == "nest":
        if name.endswith("_224"):
            return dict(img_size=32, block_size=2, embed_dims=(8, 16, 16), num_heads=(1, 2, 2), depths=(1, 1, 1))
        return dict(img_size=16, block_size=2, embed_dims=16, num_heads=2, depths=1)
    if family in ("tnt", "rtnt"):
        with torch.device("meta"):  # only the config is needed: no memory, no init
            base = nestvit.create_model(name).cfg
        L = base.num_levels
        dims = tuple(16 if i == 0 else 4 for i in range(L))
        heads = tuple(2 if i == 0 else 1 for i in range(L))
        img = base.token_sizes[0] * 2
        return dict(img_size=img, dims=dims, num_heads=heads, depth=2)
    if family == "vit":
        return dict(img_size=32 if name.endswith("_224") else 16, embed_dim=16, depth=2, num_heads=2)
    return {}


def tiny_model(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return nestvit.create_model(name, **{**tiny_overrides(name), **extra})


def rand_input(model, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
    h, w = size or model.img_size
    return torch.randn(batch, model.in_chans, h, w, generator=torch.Generator().manual_seed(1))


# a saved classifier for the commands' tests: NesT, 1x16x16 input, 3 named classes
TINY_CLASSIFIER = dict(img_size=16, in_chans=1, num_classes=3, patch_size=2, num_levels=2, block_size=4, embed_dims=8,
                       num_heads=2, depths=1)


@pytest.fixture
def weights(tmp_path) -> Path:
    """``tmp_path/run/best.safetensors``: a :data:`TINY_CLASSIFIER` NesT with its contract (classes a, b, c; mean 0.5,
    std 0.25), as a run folder's weights without the run."""
    from nestvit.contract import InputTransform, RunContract
    from nestvit.interop import save_weights

    torch.manual_seed(0)
    model = nestvit.create_model("nest_tiny_cifar", **TINY_CLASSIFIER)
    contract = RunContract(model="nest_tiny_cifar", kwargs=TINY_CLASSIFIER, classes=("a", "b", "c"),
                           transform=InputTransform(channels=1, size=(16, 16), mean=(0.5,), std=(0.25,)))
    return save_weights(model, tmp_path / "run" / "best.safetensors", contract=contract)


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden files not found at {GOLDEN}: put ../shared/golden beside the project root or set "
                    "NESTVIT_GOLDEN_DIR to the folder")
    return GOLDEN
