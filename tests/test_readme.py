"""Every command of the README runs, in the README's order, in one fresh folder, with tiny sizes.

Each ``nestvit`` line of a ``bash`` block runs through ``nestvit.cli.main`` with the extra arguments of
``TINY`` appended (fewer images, steps and widths; the later of two equal flags wins); each ``python``
block runs as it is. A line marked ``# GPU-only`` or ``# needs the internet`` in the README is checked for
its recipe only. A new README command without an entry in ``TINY`` fails here until it is given one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nestvit.cli import main
from nestvit.train.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL_TRAIN = ["--epochs", "1", "--set", "data.limit_train=128", "--set", "data.limit_eval=64",
               "--set", "global_batch=32", "--set", "progress=false"]
SMALL_NEST = ["--set", "model.overrides.embed_dims=8"]
SMALL_GAN = ["--set", "max_images=64", "--set", "batch_size=8", "--set", "steps=2", "--set", "eval_every=-1",
             "--set", "generator_overrides.embed_dims=[8,8,4]", "--set", "generator_overrides.num_heads=[2,2,1]",
             "--set", "generator_overrides.depths=[1,1,1]", "--set", "progress=false", "--set", "sample_n=4"]
FAST_BENCH = ["--mode", "infer", "--compile", "off", "--dtype", "fp32", "--batch", "1", "--warmup", "0", "--iters", "1",
              "--peak-size", "64", "--peak-iters", "1", "--no-memory", "--no-data"]

# the start of each README command -> what is appended to keep it small
TINY: dict[str, list[str]] = {
    "nestvit models": [],
    "nestvit pretrained": [],
    "nestvit train mnist5k_nest --list-keys": [],
    "nestvit train mnist5k_nest": SMALL_TRAIN + SMALL_NEST,
    "nestvit train fashion_mnist_nest": SMALL_TRAIN + SMALL_NEST,
    "nestvit train --resume": [],
    "nestvit eval": ["--limit", "64"],
    "nestvit predict": [],
    "nestvit export": [],
    "nestvit bench": FAST_BENCH,
    "nestvit explain": [],
    "nestvit generate train": SMALL_GAN,
    "nestvit generate sample": ["-n", "4"],
    "nestvit experiment": ["--quick", "--seeds", "0", "--out", "runs/experiments/quick"],
}
MARKED = ("# GPU-only", "# needs the internet")


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def entry(command: str) -> str | None:
    """The longest key of TINY that ``command`` starts with."""
    keys = [k for k in TINY if command == k or command.startswith(k + " ")]
    return max(keys, key=len) if keys else None


def commands() -> list[tuple[str, str]]:
    """``(kind, text)``: ``nestvit`` (argv after the program), ``python`` (a block or a -c line), ``marked``."""
    out = []
    for lang, code in readme_blocks():
        if lang == "python":
            out.append(("python", code))
            continue
        if lang != "bash":
            continue
        for line in code.splitlines():
            line = line.strip()
            if not line or line.startswith("make "):  # make demo / make test: the set-up, which CI itself runs
                continue
            if any(m in line for m in MARKED):
                out.append(("marked", line))
            elif line.startswith(".venv/bin/python -c "):
                out.append(("python", shlex.split(line)[2]))
            else:
                command = line.split("  #")[0].strip().removeprefix(".venv/bin/")
                out.append(("nestvit", command))
    return out


def test_every_readme_command_has_an_entry():
    missing = [text for kind, text in commands() if kind == "nestvit" and entry(text) is None]
    assert not missing, f"README commands without an entry in tests/test_readme.py TINY: {missing}"


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for kind, text in commands():
        if kind == "python":
            if "from_timm" in text:  # timm's own files: the conversion runs in tests/test_golden.py
                continue
            exec(compile(text, "README.md", "exec"), namespace)
        elif kind == "marked":  # not run here: the recipe and its --set keys must still load
            argv = shlex.split(text.split("#")[0])
            recipe = argv[argv.index("train") + 1]
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            config = load_config(recipe, sets)
            assert config.model.name or config.model.weights
        else:
            argv = shlex.split(text)[1:] + TINY[entry(text)]
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 0, f"README command failed: nestvit {' '.join(argv)}\n{err}"
    assert (tmp_path / "runs" / "demo" / "best.safetensors").is_file()
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert any((tmp_path / "explain").glob("*_gradcat.png"))
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 1 + 8  # a header and the 8 digits


@pytest.mark.parametrize("command", ["nestvit --help", "nestvit --version"])
def test_the_entry_point_is_installed(command):
    exe = Path(sys.executable).parent / "nestvit"
    assert subprocess.run([str(exe), *command.split()[1:]], capture_output=True, timeout=60).returncode == 0
