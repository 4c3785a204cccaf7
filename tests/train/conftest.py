"""Tiny training set-ups shared by the training tests: an 8x8 two-level NesT on synthetic digits."""

from __future__ import annotations

import pytest

from nestvit.train.config import load_config

TINY_MODEL = {"patch_size": 1, "num_levels": 2, "block_size": 4, "embed_dims": 16, "num_heads": 1, "depths": 1}


def tiny_recipe(**top) -> dict:
    """A recipe dict: 8x8 synthetic images, 128 train / 64 test, global batch 32 (4 steps per epoch)."""
    recipe = {
        "epochs": 2, "global_batch": 32, "eval_batch": 64, "seed": 0, "log_every": 1, "progress": False,
        "model": {"name": "nest_tiny_cifar", "overrides": dict(TINY_MODEL)},
        "data": {"name": "synthetic", "img_size": 8, "limit_train": 128, "limit_eval": 64},
        "optim": {"lr": 4e-3, "weight_decay": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    }
    for key, value in top.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe


def tiny_config(*overrides: str, **top):
    return load_config(tiny_recipe(**top), list(overrides))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Every training test on one thread (tests/conftest.py ``one_thread``)."""


@pytest.fixture(scope="session")
def make_config():
    """``make_config("optim.lr=1e-3", epochs=3)``: a tiny ``TrainConfig`` (see ``tiny_recipe``)."""
    return tiny_config


@pytest.fixture(scope="session")
def make_recipe():
    return tiny_recipe
