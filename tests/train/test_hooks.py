"""Hooks of the training loop: the built-in ones keep their records, and a user's logger is a few lines."""

from __future__ import annotations

import json
import sys

import yaml

from nestvit.cli import main
from nestvit.train import Callback, train
from nestvit.train.hooks import EmaEvaluation, Plots, TtaEvaluation


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.records: list[dict] = []

    def on_fit_start(self, trainer):
        self.calls.append("start")

    def on_record(self, trainer, record):
        self.records.append(dict(record))

    def on_evaluate(self, trainer, record):
        record["my_metric"] = 1.5  # lands in metrics.jsonl with the epoch's record

    def on_epoch_end(self, trainer, record, final):
        self.calls.append(f"epoch{'-final' if final else ''}")

    def on_fit_end(self, trainer, summary):
        summary["my_note"] = "seen"
        self.calls.append("end")


def test_a_user_hook_sees_every_record_and_adds_to_them(tmp_path, make_config):
    hook = Recorder()
    cfg = make_config("ema.decay=0.9", "tta=flip")
    train(cfg, tmp_path / "run", callbacks=[hook])
    assert hook.calls == ["start", "epoch", "epoch-final", "end"]
    kinds = [r["kind"] for r in hook.records]
    assert kinds.count("epoch") == 2 and kinds.count("step") == 8  # log_every 1, 4 steps an epoch
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in logged if r["kind"] == "epoch"]
    assert all(r["my_metric"] == 1.5 and "ema_top1" in r for r in epochs)
    assert "test_top1_tta" in epochs[-1] and "test_top1_tta" not in epochs[0]  # the final evaluation only
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["my_note"] == "seen" and summary["tta"] == "flip" and summary["ema_top1"] is not None
    assert (tmp_path / "run" / "loss.png").is_file()


def test_the_builtin_hooks_follow_the_config(tmp_path, make_config):
    from nestvit.train.distributed import DistInfo, resolve_device
    from nestvit.train.loop import Trainer

    plain = Trainer(make_config(), tmp_path / "a", DistInfo(device=resolve_device("cpu")))
    assert [type(h) for h in plain.hooks] == [Plots]
    full = Trainer(make_config("ema.decay=0.9", "tta=flip"), tmp_path / "b", DistInfo(device=resolve_device("cpu")))
    assert [type(h) for h in full.hooks] == [EmaEvaluation, TtaEvaluation, Plots]


def test_callback_on_the_command_line(tmp_path, make_recipe, monkeypatch, capsys):
    (tmp_path / "my_logger.py").write_text(
        "from nestvit.train import Callback\n\n"
        "class PrintTop1(Callback):\n"
        "    def on_record(self, trainer, record):\n"
        "        if trainer.main and record['kind'] == 'epoch':\n"
        "            print(f\"[my logger] epoch {record['epoch']}: {record['test_top1']:.2f}%\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(epochs=1)))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--callback", "my_logger:PrintTop1"]) == 0
    assert "[my logger] epoch 1:" in capsys.readouterr().out
    assert main(["train", str(recipe), "--out", str(tmp_path / "r2"), "--callback", "no_such_module:X"]) == 2
    assert "--callback no_such_module:X: cannot import it" in capsys.readouterr().err
    sys.modules.pop("my_logger", None)
