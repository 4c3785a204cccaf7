#!/usr/bin/env python
"""Fine-tuning against training from scratch on the same budget: the `finetune` recipe, measured.

Protocol (run once, reported as it comes out in docs/training.md, "Fine-tuning"):

1. pretrain: `nestvit train fashion_mnist_nest` (a 280k-parameter NesT, Fashion-MNIST, 1 channel, 28x28
   padded to 32, 10 classes, 3 epochs);
2. the target data: a folder of class folders of real MNIST digits 0-4 from `mnist5k` (5 classes), written
   as RGB PNG files (3 channels), `--per-class` training images a class (default 50: few, as adopters have)
   and every test digit 0-4 for testing; the recipe reads them at 64x64 (another size);
3. arms, each for `--seeds` seeds, all with the `finetune` recipe's budget (20 epochs of the training
   images, batch 32, cosine, warm-up 1 epoch):
   - `finetune`: `nestvit train finetune --set model.weights=PRETRAIN_RUN --set data.root=DIR`;
   - `scratch`: the same command and architecture without the weights (`model.name` and overrides of the
     pretrained run), at the recipe's learning rate 5e-4;
   - `scratch, lr 2e-3`: the same at the pretraining recipe's learning rate (from-scratch training likes a
     larger one), so that the comparison does not rest on one learning rate.

    .venv/bin/python experiments/finetune_study.py [--out runs/finetune_study] [--seeds 0 1] [--per-class 50]

Finished runs (a `summary.json`) are read back, not retrained. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nestvit.cli import main


def write_digits(root: Path, per_class: int, classes: tuple[int, ...]) -> None:
    """``root/{train,test}/<digit>/*.png`` RGB files of mnist5k digits ``classes``."""
    from nestvit.data import load_dataset

    if (root / "done").is_file():
        return
    for split, limit in (("train", per_class), ("test", None)):
        ds = load_dataset("mnist5k", split=split)
        for c in classes:
            idx = (ds.labels == c).nonzero().flatten().tolist()[:limit]
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                grey = ds.images[i, 0].numpy()
                Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / f"{i:05d}.png")
    (root / "done").write_text("ok\n")


def run(out: Path, argv: list[str]) -> dict:
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    t0 = time.perf_counter()
    code = main([*argv, "--out", str(out)])
    if code != 0:
        sys.exit(f"failed: nestvit {' '.join(argv)}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command_s"] = round(time.perf_counter() - t0, 1)
    return summary


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/finetune_study"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--per-class", type=int, default=50)
    a = p.parse_args(argv)
    pre = a.out / "pretrain"
    s = run(pre, ["train", "fashion_mnist_nest", "--set", "progress=false"])
    print(f"pretrain: fashion_mnist_nest, test top-1 {s['test_top1']:.2f}% ({s['wall_s']:.0f} s)", flush=True)
    data = a.out / f"digits{a.per_class}"
    write_digits(data, a.per_class, (0, 1, 2, 3, 4))
    import nestvit

    contract = nestvit.load(pre).contract
    arch = ["--set", f"model.name={contract.model}"]
    for k, v in contract.kwargs.items():
        if k not in ("num_classes", "in_chans", "img_size"):
            arch += ["--set", f"model.overrides.{k}={json.dumps(v)}"]
    common = ["train", "finetune", "--set", f"data.root={data}", "--set", "data.img_size=64", "--set",
              "data.workers=0", "--set", "progress=false"]
    arms = {"finetune (Fashion-MNIST weights)": ["--set", f"model.weights={pre}"],
            "scratch, lr 5e-4": arch,
            "scratch, lr 2e-3": [*arch, "--set", "optim.lr=2e-3"]}
    rows = []
    for arm, extra in arms.items():
        tops, secs = [], []
        for seed in a.seeds:
            slug = arm.split(" ")[0] + ("-lr2e-3" if "2e-3" in arm else "")
            res = run(a.out / f"{slug}-{a.per_class}-s{seed}", [*common, *extra, "--set", f"seed={seed}"])
            tops.append(res["test_top1"])
            secs.append(res["wall_s"])
            print(f"{arm} seed {seed}: test top-1 {res['test_top1']:.2f}% ({res['wall_s']:.0f} s)", flush=True)
        sd = statistics.stdev(tops) if len(tops) > 1 else 0.0
        rows.append(f"| {arm} | {' / '.join(f'{t:.2f}' for t in tops)} | {statistics.mean(tops):.2f} +- {sd:.2f} | "
                    f"{statistics.mean(secs):.0f} |")
    n_test = sum(1 for _ in (data / "test").rglob("*.png"))
    print(f"\n{a.per_class} training images a class, 5 classes, {n_test} test images, RGB 64x64, seeds "
          f"{' '.join(map(str, a.seeds))}\n")
    print("| arm | test top-1 % per seed | mean +- std | s per run |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
