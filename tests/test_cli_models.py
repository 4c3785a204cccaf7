"""``nestvit models``, ``--version`` and ``--help``."""

from __future__ import annotations

import json

import pytest
import torch

import nestvit
import nestvit.models.vit  # noqa: F401  (registers the ViT entries)
from nestvit import create_model, list_models
from nestvit.cli import main


def _params(name: str) -> int:
    with torch.device("meta"):
        return create_model(name).num_params()


def test_models_lists_every_nest_entry(capsys):
    assert main(["models", "nest_*"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    names = list_models("nest_*")
    assert names and "nest_tiny_cifar" in names
    for name in names:
        assert name in lines, f"{name} missing from\n{out}"
        row = lines[name].split()
        assert row[1] == f"{_params(name) / 1e6:.2f}"
        assert float(row[2]) > 0  # GFLOPs
        assert row[-1] == "nest"
    assert lines["nest_tiny_cifar"].split()[1:4] == ["6.01", "4.15", "3x32x32"]
    assert "vit_" not in out and "deit_" not in out


def test_models_json_and_family(capsys):
    assert main(["models", "--family", "vit", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(list_models(family="vit"))
    by_name = {r["name"]: r for r in rows}
    assert by_name["deit_tiny_patch16_224"]["params"] == 5_717_416
    assert by_name["deit_tiny_patch16_224"]["input_size"] == [3, 224, 224]
    assert all(r["family"] == "vit" and r["gflops"] > 0 for r in rows)


def test_models_no_match_is_an_error(capsys):
    assert main(["models", "no_such_model_*"]) == 2
    assert "no registered model matches" in capsys.readouterr().err
    assert main(["models", "--family", "nope"]) == 2
    assert "unknown family" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert nestvit.__version__ in capsys.readouterr().out


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "models" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["models", "--help"])
    assert e.value.code == 0
    assert "--family" in capsys.readouterr().out


def test_python_dash_m_nestvit_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nestvit", "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nest_tiny_cifar" in out.stdout and "rtnt_nano" in out.stdout
