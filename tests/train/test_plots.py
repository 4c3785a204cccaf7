"""Plots are valid PNG files; smoothing is TensorBoard's debiased EMA."""

from __future__ import annotations

import json

import pytest

from nestvit.train.metrics import EvalResult
from nestvit.train.plots import plot_confusion, plot_run, smooth

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 1000


def test_smooth():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: a constant stays constant
    s = smooth([0.0, 10.0], weight=0.5)
    assert s == pytest.approx([0.0, (0.5 * 0.0 * 0.5 + 0.5 * 10.0) / (1 - 0.25)])
    assert smooth([], 0.9) == []


def test_plot_run_writes_pngs(tmp_path):
    records = [{"kind": "step", "epoch": 1 + i // 10, "step": i + 1, "loss": 2.3 / (1 + i), "acc": i, "lr": 1e-3}
               for i in range(30)]
    records += [{"kind": "epoch", "epoch": e, "step": 10 * e, "train_acc": 50 + e, "test_top1": 40 + e,
                 "ema_top1": 41 + e} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png", "lr.png"]
    assert all(is_png(p) for p in paths)


def test_a_run_shorter_than_log_every_still_plots_its_loss(tmp_path):
    # no step records (fewer steps than log_every): loss and lr come from the epochs' records
    records = [{"kind": "epoch", "epoch": e, "step": 3 * e, "train_loss": 2.0 / e, "train_acc": 50 + e,
                "test_top1": 40 + e, "lr": 1e-3 / e} for e in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sorted(p.name for p in plot_run(tmp_path)) == ["accuracy.png", "loss.png", "lr.png"]


def test_balanced_accuracy_counts_each_class_the_same():
    # 90 cats, 10 dogs: calling everything a cat is 90 % top-1 but 50 % balanced
    r = EvalResult(loss=0.1, top1=90.0, top5=100.0, count=100, confusion=[[90, 0, 0], [10, 0, 0], [0, 0, 0]],
                   classes=["cat", "dog", "eel"])
    assert r.per_class_count == {"cat": 90, "dog": 10, "eel": 0}
    assert r.balanced_top1 == pytest.approx(50.0) and r.unequal  # eel has no images: not counted
    assert not EvalResult(loss=0.1, top1=50.0, top5=100.0, count=20, confusion=[[5, 5], [5, 5]],
                          classes=["cat", "dog"]).unequal
    assert json.loads(json.dumps(r.to_json()))["balanced_top1"] == pytest.approx(50.0)


def test_confusion_png(tmp_path):
    path = plot_confusion([[5, 1], [0, 4]], ["cat", "dog"], tmp_path / "c.png")
    assert is_png(path)
    many = [[int(i == j) for j in range(30)] for i in range(30)]  # no cell labels past 20 classes
    assert is_png(plot_confusion(many, [str(i) for i in range(30)], tmp_path / "many.png"))
