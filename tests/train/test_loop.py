"""The training loop: accumulation, bit-exact resume, crash safety, non-finite losses, run files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from nestvit.cli import main as cli_main
from nestvit.data.augment import tta_views
from nestvit.system import cpu_has_fast_bf16, machine_info, machine_label
from nestvit.train import checkpoint as ckpt
from nestvit.train import config as C
from nestvit.train import loop
from nestvit.train.checkpoint import load_state
from nestvit.train.config import ConfigError
from nestvit.train.distill import balanced_class_weights
from nestvit.train.inputs import Split, TrainBatches, load_split
from nestvit.train.loop import NonFiniteLossError, train
from nestvit.train.metrics import read_metrics
from nestvit.train.optim import LRSchedule

# every source of randomness the loop has: augmentation draws, drop path, mixup, EMA
RANDOM = ["aug.crop_padding=1", "aug.hflip=true", "aug.mixup_alpha=0.4", "aug.mix_prob=0.5",
          "aug.random_erasing=0.3", "aug.label_smoothing=0.1", "model.overrides.drop_path_rate=0.2", "ema.decay=0.9"]


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, make_config):
    full = train(make_config("epochs=1", "micro_batch=32"), tmp_path / "full")
    accum = train(make_config("epochs=1", "micro_batch=16"), tmp_path / "accum")
    assert full.steps == accum.steps == 4
    assert_same_weights(weights(tmp_path / "full/last.safetensors"), weights(tmp_path / "accum/last.safetensors"),
                        exact=False)


def test_resume_is_bit_exact(tmp_path, make_config):
    cfg = make_config(*RANDOM)
    straight = train(cfg, tmp_path / "a")
    first = train(cfg, tmp_path / "b", stop_after_epochs=1)
    assert first.epochs_done == 1 and load_state(tmp_path / "b")["epoch"] == 1
    with open(tmp_path / "b/metrics.jsonl", "a") as f:  # a record torn by the kill
        f.write('{"kind": "step", "epoch": 2, "st')
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed.epochs_done == straight.epochs_done == 2 and resumed.steps == straight.steps == 8
    for name in ("last", "ema"):
        assert_same_weights(weights(tmp_path / f"a/{name}.safetensors"), weights(tmp_path / f"b/{name}.safetensors"))
    sa, sb = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    # the resumed log has each step once and the same losses
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    steps = lambda log: [(r["step"], r["loss"]) for r in log if r["kind"] == "step"]  # noqa: E731
    assert steps(la) == steps(lb)


def test_a_resume_keeps_the_data_and_model_it_was_trained_with(tmp_path, make_config, capsys):
    # before: --set data.name=... on --resume trained on another data set with the first one's normalisation
    train(make_config("epochs=1"), tmp_path / "run")
    for change, what in (("data.pad_to=10", "data.pad_to None -> 10"), ("data.mean=[0.3]", "data.mean"),
                         ("model.name=vit_tiny_patch4_32", "model.name 'nest_tiny_cifar' -> 'vit_tiny_patch4_32'")):
        with pytest.raises(ConfigError, match=rf"trained with other data or another model: {re.escape(what)}.*"
                                              "fine-tune this one: nestvit train finetune"):
            train(make_config("epochs=2", change), tmp_path / "run", resume=True)
    assert load_state(tmp_path / "run")["epoch"] == 1  # nothing trained
    # keys left open (filled from the run) and keys that do not change what the model sees are fine
    capsys.readouterr()
    assert train(make_config("epochs=2", "data.limit_eval=32"), tmp_path / "run", resume=True).epochs_done == 2
    # more epochs stretch the cosine schedule: the learning rate jumps back up, and the run says so
    assert "note: the cosine schedule now spans 8 steps, so the learning rate goes on from" in capsys.readouterr().out


def test_resume_mid_epoch_after_a_kill(tmp_path, make_config, monkeypatch):
    cfg = make_config(*RANDOM, "checkpoint_every=3")
    train(cfg, tmp_path / "a")
    real_step = loop.Trainer.train_step

    def killed_at_step_5(self, x, t):
        if self.step == 5:
            raise KeyboardInterrupt  # the process dies after the step-3 checkpoint (epoch 1, batch 4 done)
        return real_step(self, x, t)

    monkeypatch.setattr(loop.Trainer, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b")
    state = load_state(tmp_path / "b")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 0)  # epoch-end checkpoint at 4
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    train(cfg, tmp_path / "b", resume=True)
    assert_same_weights(weights(tmp_path / "a/last.safetensors"), weights(tmp_path / "b/last.safetensors"))


def test_mid_epoch_checkpoint_resume(tmp_path, make_config, monkeypatch):
    cfg = make_config(*RANDOM, "checkpoint_every=2", "epochs=1")
    train(cfg, tmp_path / "a")
    real_step = loop.Trainer.train_step

    def killed(self, x, t):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, x, t)

    monkeypatch.setattr(loop.Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b")
    state = load_state(tmp_path / "b")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    train(cfg, tmp_path / "b", resume=True)
    assert_same_weights(weights(tmp_path / "a/last.safetensors"), weights(tmp_path / "b/last.safetensors"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, make_config, monkeypatch):
    cfg = make_config("epochs=2")
    train(cfg, tmp_path / "run", stop_after_epochs=1)
    good = load_state(tmp_path / "run")
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, tmp_path / "run", resume=True)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    after = load_state(tmp_path / "run")  # still the epoch-1 state, readable
    assert after["step"] == good["step"] == 4
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temporary file left behind
    train(cfg, tmp_path / "run", resume=True)  # and the run can still be continued
    assert load_state(tmp_path / "run")["epoch"] == 2


def test_non_finite_loss_names_the_step(tmp_path, make_config, monkeypatch):
    calls = {"n": 0}
    real = loop.classification_loss

    def goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop, "classification_loss", goes_nan)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(epoch 1, batch 3 of 4\)"):
        train(make_config(), tmp_path / "run")
    assert not (tmp_path / "run" / "state.pt").exists()  # nothing written after a bad step


def test_refuses_to_overwrite_a_run(tmp_path, make_config):
    train(make_config("epochs=1"), tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_config("epochs=1"), tmp_path / "run")


def test_run_directory_contents(tmp_path, make_config):
    result = train(make_config("ema.decay=0.5", "epochs=2"), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "state.pt", "last.safetensors", "best.safetensors", "ema.safetensors",
                 "metrics.jsonl", "confusion.json", "confusion.png", "loss.png", "accuracy.png", "lr.png",
                 "summary.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for key in ("train_loss", "train_acc", "test_top1", "test_top5", "ema_top1", "img_s", "data_img_s", "lr"):
        assert key in epochs[-1], key
    conf = json.loads((run / "confusion.json").read_text())
    assert sum(map(sum, conf["confusion"])) == 64 and len(conf["per_class_accuracy"]) == 10
    assert result.test.top1 == pytest.approx(epochs[-1]["test_top1"])
    assert 0 <= result.test.top1 <= result.test.top5 <= 100
    # the config is written with the measured normalisation
    from nestvit.train.config import load_config

    saved = load_config(run / "config.yaml")
    assert saved.data.mean is not None and len(saved.data.mean) == 1


def test_the_tiny_model_learns(tmp_path, make_config):
    result = train(make_config("epochs=8", "optim.lr=1e-2", "optim.lr_ref_batch=0", "data.limit_train=256"),
                   tmp_path / "run")
    assert result.test.top1 > 80  # chance is 10%


def test_balanced_class_weights_train_and_are_said(tmp_path, make_config, capsys, monkeypatch):
    seen = []

    def spy(*args, class_weights=None, **kwargs):
        seen.append(class_weights)
        return loop_loss(*args, class_weights=class_weights, **kwargs)

    loop_loss = loop.classification_loss
    monkeypatch.setattr(loop, "classification_loss", spy)
    result = train(make_config("class_weights=balanced", "epochs=1"), tmp_path / "run")
    out = capsys.readouterr().out
    assert "class weights: balanced (N / (K x images of the class)): class0 " in out and " and 2 more (from " in out
    labels = load_split(make_config().data, "train", torch.device("cpu"), limit=128).labels
    assert len(seen) == 4 and all(torch.equal(w, balanced_class_weights(labels, 10)) for w in seen)  # every step
    # the synthetic test split's classes differ in size: its balanced accuracy is reported beside top-1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_balanced_top1"] == pytest.approx(result.test.balanced_top1) and " balanced " in out
    with pytest.raises(C.ConfigError, match="class_weights"):
        make_config("class_weights=inverse")


def test_training_classes_of_unequal_size_are_said(tmp_path, make_config, capsys):
    train(make_config("data.limit_train=64", "epochs=1"), tmp_path / "run")  # 12 images of class3, 3 of class7
    assert ("note: the training classes differ in size (class3 12 images, class7 3): top-1 favours the large "
            "ones; --set class_weights=balanced") in capsys.readouterr().out


def test_step_order_is_shared_by_world_sizes():
    split = Split(name="x", labels=torch.arange(100), classes=["a"], channels=1, size=(1, 1),
                  images=torch.zeros(100, 1, 1, 1, dtype=torch.uint8))
    one = TrainBatches(split, global_batch=20, rank=0, world_size=1, seed=3, device=torch.device("cpu"))
    two = [TrainBatches(split, global_batch=20, rank=r, world_size=2, seed=3, device=torch.device("cpu"))
           for r in range(2)]
    for epoch in range(2):
        whole = one.step_indices(epoch)
        assert torch.equal(torch.cat([t.step_indices(epoch) for t in two], dim=1), whole)
        assert len(set(whole.flatten().tolist())) == 100  # each image once per epoch
    assert not torch.equal(one.step_indices(0), one.step_indices(1))
    labels = [lab for _, lab in one.epoch(1, start_step=3)]
    assert len(labels) == 2 and torch.equal(labels[0], one.step_indices(1)[3])


def test_bf16_autocast_and_fp16_refusal_on_cpu(tmp_path, make_config, monkeypatch, capsys):
    result = train(make_config("epochs=1", "precision=bf16"), tmp_path / "bf16")
    assert result.steps == 4 and 0 <= result.test.top1 <= 100
    fast = capsys.readouterr().out
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)  # an AVX2-only CPU: one warning line
    train(make_config("epochs=1", "precision=bf16"), tmp_path / "slow")
    slow = capsys.readouterr().out
    assert [line for line in slow.splitlines() if "no fast bf16 kernels" in line][0].endswith(
        "--set precision=auto (fp32 here)")
    assert ("no fast bf16 kernels" in fast) == (not cpu_has_fast_bf16())
    # precision auto: fp32 on that CPU (no warning, same numbers as fp32), bf16 on one with fast kernels
    auto = train(make_config("epochs=1", "precision=auto"), tmp_path / "auto")
    out = capsys.readouterr().out
    assert "precision auto -> fp32" in out and "no fast bf16 kernels" not in out
    summary = json.loads((tmp_path / "auto/summary.json").read_text())
    assert summary["precision"] == "fp32"
    # the run records the machine it ran on (a time-budgeted result depends on it), and its header names it
    here = machine_info()
    assert {k: summary["machine"][k] for k in ("cpu_model", "cpu_family", "cpu_model_number", "cpu_flags")} == {
        k: here[k] for k in ("cpu_model", "cpu_family", "cpu_model_number", "cpu_flags")}
    assert f"; {machine_label(summary['machine'])}), precision auto -> fp32" in out
    fp32 = train(make_config("epochs=1"), tmp_path / "fp32")
    assert auto.test.top1 == fp32.test.top1 and auto.test.loss == fp32.test.loss
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: True)
    train(make_config("epochs=1", "precision=auto"), tmp_path / "auto_bf16")
    assert "precision auto -> bf16" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto_bf16/summary.json").read_text())["precision"] == "bf16"
    from nestvit.train.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(make_config("epochs=1", "precision=fp16"), tmp_path / "fp16")


def test_imagefolder_streams_through_a_dataloader(tmp_path, make_config):
    import numpy as np
    from PIL import Image

    for split, n in (("train", 8), ("val", 4)):
        for label, value in (("dark", 30), ("light", 220)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((12, 10, 3), value, np.uint8) + np.uint8(i)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = make_config("epochs=2", "global_batch=4", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
                      "data.eval_split=val", "data.img_size=8", "data.workers=0", "data.limit_train=null",
                      "data.limit_eval=null", "optim.lr=1e-2")
    result = train(cfg, tmp_path / "run")
    assert result.steps == 8 and result.test.count == 8 and result.test.classes == ["dark", "light"]


@pytest.mark.parametrize("mode, views", [("flip", 2), ("shift", 9), ("flip-shift", 18)])
def test_tta_averages_the_softmax_of_every_view(mode, views):
    from torch import nn

    from nestvit.train.inputs import Split
    from nestvit.train.loop import evaluate, tta_views

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 4, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    split = Split("toy", labels, ["a", "b", "c"], 1, (4, 6), images=images)
    model = nn.Sequential(nn.Flatten(), nn.Linear(24, 3))  # neither mirror- nor shift-invariant
    raw = images.float()
    moved = []  # each view by hand: mirror, then move with zeros coming in (before normalising)
    for mirrored in (False, True) if "flip" in mode else (False,):
        src = raw.flip(-1) if mirrored else raw
        for dy, dx in [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if "shift" in mode else [(0, 0)]:
            out = torch.zeros_like(src)
            out[..., max(dy, 0):4 + min(dy, 0), max(dx, 0):6 + min(dx, 0)] = \
                src[..., max(-dy, 0):4 + min(-dy, 0), max(-dx, 0):6 + min(-dx, 0)]
            moved.append(out)
    assert len(moved) == len(tta_views(mode)) == views and tta_views(mode)[0] == (False, 0, 0)
    with torch.no_grad():
        probs = sum(model((x / 255 - 0.5) / 0.25).softmax(-1) for x in moved) / views
    plain = evaluate(model, split, mean=(0.5,), std=(0.25,), batch=5)
    tta = evaluate(model, split, mean=(0.5,), std=(0.25,), batch=5, tta=mode)
    want_top1 = 100.0 * (probs.argmax(-1) == labels).float().mean().item()
    want_loss = nn.functional.nll_loss(probs.log(), labels).item()
    assert tta.top1 == pytest.approx(want_top1) and tta.loss == pytest.approx(want_loss, rel=1e-5)
    assert plain.loss != pytest.approx(tta.loss)


def test_an_unknown_tta_mode_is_named():
    from nestvit.train.loop import tta_views

    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'.*flip-shift"):
        tta_views("rotate")


def test_a_time_budget_stops_inside_an_epoch_and_logs_the_lr_it_used(tmp_path, make_config, capsys):
    cfg = make_config("epochs=3", "time_budget_min=1e-6", "schedule.warmup_epochs=0")  # spent by step 1
    res = train(cfg, tmp_path / "run")
    assert res.steps == 1 and res.epochs_done == 0 and res.test is not None
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["stopped_by_budget"] and summary["epochs"] == 0.25 and summary["steps"] == 1
    last = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"][-1]
    assert last["epoch"] == 0.25 and "test_top1" in last  # evaluated where it stopped
    # the records log the learning rate the step used (the peak: no time had passed yet), as the optimizer has it
    assert last["lr"] == load_state(tmp_path / "run")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert load_state(tmp_path / "run")["elapsed_s"] > 0
    again = train(cfg, tmp_path / "run", resume=True)  # the budget counts the earlier pieces: nothing to do
    assert again.steps == 1
    capsys.readouterr()
    assert train(make_config("epochs=6", "time_budget_min=1e-6", "schedule.warmup_epochs=0"), tmp_path / "run",
                 resume=True).steps == 1  # more epochs do not help a run its budget stopped: said so
    out = capsys.readouterr().out
    assert "already finished (stopped by its time budget, time_budget_min=1e-06): 0.25/6 epochs" in out
    assert "resume with a larger --set time_budget_min" in out


def fake_clock(monkeypatch, *, step_s: float, eval_s: float) -> tuple[dict[str, float], list[str]]:
    """Drive the trainer's clock by hand: ``step_s`` per optimizer step, ``eval_s`` per evaluation and view.

    Returns the clock (``{"s": seconds}``) and the ``tta`` mode of every evaluation, in order.
    """
    clock, calls = {"s": 0.0}, []
    real_step, real_eval = loop.Trainer.train_step, loop.Trainer.evaluate

    def step(self, *args):
        clock["s"] += step_s
        return real_step(self, *args)

    def evaluate(self, model, tta="none"):
        calls.append(tta)
        clock["s"] += eval_s * len(tta_views(tta))
        return real_eval(self, model, tta)

    monkeypatch.setattr(loop.Trainer, "train_step", step)
    monkeypatch.setattr(loop.Trainer, "evaluate", evaluate)
    monkeypatch.setattr(loop.Trainer, "elapsed", lambda self: clock["s"])
    return clock, calls


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_a_final_tta_evaluation_is_reserved_inside_the_budget(tmp_path, make_config, monkeypatch, tta):
    """``tta``: the final evaluation adds the multi-view top-1, and its cost (the last evaluation's time per
    view, plus the single view) is kept in reserve, so the run stops earlier and the whole fits the budget."""
    clock, calls = fake_clock(monkeypatch, step_s=10.0, eval_s=5.0)
    res = train(make_config("epochs=3", "time_budget_min=1", f"tta={tta}"), tmp_path / "run")
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    last = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"][-1]
    if tta == "none":  # 4 steps + 5 s = 45 s, 5 s reserved: one more step (55 + 5 s), then the final evaluation
        assert res.steps == 5 and calls == ["none", "none"] and "test_top1_tta" not in summary
    else:  # 45 s + 3 x 5 s reserved = the budget: stop after epoch 1, then the 2-view evaluation (55 s in all)
        assert res.steps == 4 and calls == ["none", "flip"] and clock["s"] == 55.0
        assert summary["tta"] == "flip" and summary["test_top1_tta"] == last["test_top1_tta"]
        # the number is the one `nestvit eval RUN --tta flip` gives for the final weights
        assert cli_main(["eval", str(tmp_path / "run"), "--weights", "last", "--tta", "flip", "--limit", "64",
                         "--out", str(tmp_path / "ev")]) == 0
        assert json.loads((tmp_path / "ev/eval.json").read_text())["top1"] == summary["test_top1_tta"]


def test_a_budget_that_is_not_reached_changes_nothing(tmp_path, make_config):
    train(make_config(*RANDOM), tmp_path / "a")
    res = train(make_config(*RANDOM, "time_budget_min=600"), tmp_path / "b")
    assert res.epochs_done == 2
    assert_same_weights(weights(tmp_path / "a/last.safetensors"), weights(tmp_path / "b/last.safetensors"))
    assert not json.loads((tmp_path / "b/summary.json").read_text())["stopped_by_budget"]


def test_an_evaluation_that_spends_the_budget_ends_the_run_at_that_epoch(tmp_path, make_config, monkeypatch):
    fake_clock(monkeypatch, step_s=10.0, eval_s=100.0)
    cfg = make_config("epochs=3", "time_budget_min=1")
    res = train(cfg, tmp_path / "run")  # 4 steps = 40 s, then 140 s
    assert res.steps == 4 and res.epochs_done == 1  # not one more step into epoch 2
    # the decay followed the clock (step s starts at 10 s x s of 60), ahead of the 12 planned steps, and the
    # records log it
    sched = LRSchedule.from_config(cfg.schedule, peak=cfg.scaled_lr(), steps_per_epoch=4, epochs=3)
    logged = [r["lr"] for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert logged == pytest.approx([sched(s, time_frac=10 * s / 60) for s in range(4)])
    assert logged[3] < sched(3)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["stopped_by_budget"] and summary["epochs"] == 1


def record_loss_calls(monkeypatch) -> list[tuple[int, torch.Tensor]]:
    """Every ``Trainer.loss`` call from now on: its number of images and the flat weights it ran at."""
    seen = []
    real_loss = loop.Trainer.loss

    def recording(self, xs, ts):
        seen.append((xs.shape[0], torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])))
        return real_loss(self, xs, ts)

    monkeypatch.setattr(loop.Trainer, "loss", recording)
    return seen


def test_sam_steps_with_the_gradient_at_the_moved_weights(tmp_path, make_config, monkeypatch, capsys):
    """Each step: a pass on ``sam_batch`` images at the weights, then the batch at weights ``rho`` away."""
    seen = record_loss_calls(monkeypatch)
    result = train(make_config("epochs=1", "optim.sam_rho=0.05", "optim.sam_batch=8"), tmp_path / "sam")
    assert result.steps == 4 and [n for n, _ in seen] == [8, 32] * 4
    for (_, at), (_, moved) in zip(seen[::2], seen[1::2]):
        assert abs(torch.linalg.vector_norm(moved - at).item() - 0.05) < 1e-4
    # and the update starts from the weights the ascent found, not from the moved ones
    for (_, moved), (_, next_at) in zip(seen[1::2], seen[2::2]):
        assert torch.linalg.vector_norm(next_at - moved).item() > 0.01
    assert "SAM rho 0.05 on 8 images a step" in capsys.readouterr().out


def test_sam_with_a_vanishing_radius_trains_what_plain_steps_train(tmp_path, make_config):
    plain = train(make_config("epochs=1"), tmp_path / "plain")
    tiny = train(make_config("epochs=1", "optim.sam_rho=1e-30"), tmp_path / "tiny")
    sam = train(make_config("epochs=1", "optim.sam_rho=0.5"), tmp_path / "sam")
    assert plain.steps == tiny.steps == sam.steps == 4
    assert_same_weights(weights(tmp_path / "plain/last.safetensors"), weights(tmp_path / "tiny/last.safetensors"))
    a, b = weights(tmp_path / "plain/last.safetensors"), weights(tmp_path / "sam/last.safetensors")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_sam_ascent_takes_at_most_one_micro_batch(tmp_path, make_config, monkeypatch, capsys):
    seen = record_loss_calls(monkeypatch)
    train(make_config("epochs=1", "micro_batch=16", "optim.sam_rho=0.05", "optim.sam_batch=1000"), tmp_path / "sam")
    assert [n for n, _ in seen] == [16, 16, 16] * 4  # ascent, then the two accumulated micro-batches
    assert "SAM rho 0.05 on 16 images a step" in capsys.readouterr().out


def test_a_run_of_an_older_version_still_resumes(tmp_path, make_config):
    # its saved options are read as today's (a retired NesT option dropped), as the weights are: no "change"
    cfg = make_config("epochs=1")
    saved = C.to_dict(cfg)
    saved["model"]["overrides"] = {**saved["model"]["overrides"], "cpu_chunk_tokens": 4096}
    loop.check_resumable(saved, cfg, tmp_path)
    saved["model"]["overrides"]["depths"] = 2
    with pytest.raises(ConfigError, match="model.overrides.depths 2 -> 1"):
        loop.check_resumable(saved, cfg, tmp_path)


def test_best_weights_of_equal_top1_go_to_the_lower_loss(tmp_path, make_config, monkeypatch):
    """A small hold-out scores every epoch alike: best.safetensors is then the epoch of the lowest loss, not the
    first one (which shipped epoch 1 of 10), and the commands say which epoch they use."""
    from nestvit.train.metrics import EvalResult

    def flat(self, model, tta="none"):
        return EvalResult(loss={1: 0.9, 2: 0.5}.get(self.epoch, 0.7), top1=50.0, top5=90.0, count=2,
                          confusion=[[1] + [0] * 9] * 10, classes=[str(i) for i in range(10)])

    monkeypatch.setattr(loop.Trainer, "evaluate", flat)
    train(make_config("epochs=3"), tmp_path / "run")
    import nestvit

    loaded = nestvit.load(tmp_path / "run")
    assert loaded.contract.info["epoch"] == 2
    assert loaded.describe() == f"{tmp_path / 'run' / 'best.safetensors'} (epoch 2 of 3, top-1 50.00 %)"


def test_a_state_from_before_the_tie_rule_keeps_the_earlier_best(tmp_path, make_config, monkeypatch):
    """A run saved before state.pt recorded best_loss resumes with its old rule (ties to the earlier epoch)."""
    import nestvit
    from nestvit.train.metrics import EvalResult

    def flat(self, model, tta="none"):
        return EvalResult(loss={1: 0.9}.get(self.epoch, 0.5), top1=50.0, top5=90.0, count=2,
                          confusion=[[1] + [0] * 9] * 10, classes=[str(i) for i in range(10)])

    monkeypatch.setattr(loop.Trainer, "evaluate", flat)
    train(make_config("epochs=1"), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    del state["best_loss"]
    torch.save(state, tmp_path / "run" / "state.pt")
    train(make_config("epochs=2"), tmp_path / "run", resume=True)
    assert nestvit.load(tmp_path / "run").contract.info["epoch"] == 1
