"""``nestvit experiment``: the drivers in --quick mode (synthetic images, seconds) and the mean/spread math."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from nestvit import experiments as E
from nestvit.cli import build_parser
from nestvit.system import machine_info, machine_label


def test_mean_spread_math():
    s = E.mean_spread([90.0, 92.0, 94.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(92.0)
    assert s["std"] == pytest.approx(2.0)  # sample standard deviation (ddof 1)
    assert (s["min"], s["max"]) == (90.0, 94.0)
    one = E.mean_spread([80.0])
    assert one["std"] is None and one["mean"] == 80.0
    assert E.mean_spread([])["mean"] is None
    assert E.mean_spread([1.0, float("nan"), 3.0])["mean"] == pytest.approx(2.0)
    assert E.fmt_ms(s) == "92.00 ± 2.00"
    assert E.fmt_ms(one) == "80.00"
    assert E.fmt_ms(E.mean_spread([])) == "-"


def test_merge_is_deep_and_keeps_inputs():
    base = {"optim": {"lr": 1.0, "weight_decay": 0.0}, "model": {"overrides": {"a": 1}}}
    out = E._merge(base, {"optim": {"lr": 2.0}, "model": {"overrides": {"b": 2}}})
    assert out["optim"] == {"lr": 2.0, "weight_decay": 0.0}
    assert out["model"]["overrides"] == {"b": 2}  # overrides are replaced, not merged
    assert base["optim"]["lr"] == 1.0


def _args(name: str, tmp_path, *extra: str):
    args = build_parser().parse_args(["experiment", name, "--quick", "--seeds", "0", "1", "--out",
                                      str(tmp_path / name), "--threads", "1", *extra])
    args.argv = [name, "--quick"]
    return args


@pytest.mark.parametrize("name", list(E.EXPERIMENTS))
def test_plans_are_valid_configs(name):
    """Every default (full-size) plan builds valid TrainConfigs, without training anything."""
    from nestvit.train.config import TrainConfig, from_dict

    args = build_parser().parse_args(["experiment", name])
    plan = E.EXPERIMENTS[name](args)
    assert len(plan.seeds) >= 2 and plan.arms
    assert len({a.name for a in plan.arms}) == len(plan.arms)
    for arm in plan.arms:
        from_dict(TrainConfig, arm.recipe)


def test_rtnt_plan_switches_the_innermost_level():
    args = build_parser().parse_args(["experiment", "rtnt_vs_tnt", "--data", "mnist5k"])
    arms = E.plan_rtnt_vs_tnt(args).arms
    assert [a.recipe["model"]["overrides"]["innermost"] for a in arms] == [True, False]
    assert all(a.recipe["schedule"] == {"name": "step", "step_every": 200, "gamma": 0.96} for a in arms)


def test_data_efficiency_same_step_budget():
    args = build_parser().parse_args(["experiment", "data_efficiency", "--train-sizes", "500", "1000", "3000",
                                      "--steps", "47"])
    arms = E.plan_data_efficiency(args).arms
    for arm in arms:
        size = arm.labels["train_size"]
        assert arm.recipe["epochs"] == max(1, round(47 * 64 / size))
        assert arm.recipe["epochs"] // arm.recipe["eval_every"] <= 10  # about ten evaluations at most
    defaults = E.plan_data_efficiency(build_parser().parse_args(["experiment", "data_efficiency"])).arms
    assert sorted({a.labels["train_size"] for a in defaults}) == [1000, 6000, 60000]
    assert len({a.labels["model"] for a in defaults}) == 4  # NesT, matched ViT, TNT, RTNT
    assert {a.recipe["epochs"] for a in defaults if a.labels["train_size"] == 60000} == {1}


@pytest.mark.parametrize("name", ["rtnt_vs_tnt", "data_efficiency"])
def test_quick_mode_writes_json_markdown_png(name, tmp_path):
    result = E.run_experiment(_args(name, tmp_path), log=lambda m: None)
    out = tmp_path / name
    data = json.loads((out / "results.json").read_text())
    assert data["experiment"] == name and data["seeds"] == [0, 1]
    assert len(data["runs"]) == 2 * len(data["rows"])
    for row in data["rows"]:
        acc = row["test_top1"]
        seeds = [r["test_top1"] for r in data["runs"] if r["arm"] == row["arm"]]
        assert acc["n"] == 2 and math.isclose(acc["mean"], sum(seeds) / 2)
        assert row["params"] > 0 and row["flops"] > 0
    md = (out / "results.md").read_text()
    assert md.startswith(f"### `{name}`") and "mean ± std" in md
    assert "**Quick smoke test, not a result**" in md  # before: the notes of the full study only
    assert f"; machine: {machine_label(machine_info())}." in md  # every run recorded the same machine
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["meta"]["wall_s"] >= 0
    # a second call reads the finished runs back instead of retraining them
    again = E.run_experiment(_args(name, tmp_path), log=lambda m: None)
    assert [r["test_top1"] for r in again["runs"]] == [r["test_top1"] for r in result["runs"]]


@pytest.mark.parametrize("name", ["aggregation", "hierarchy", "best_fashion_mnist"])
def test_quick_mode_other_experiments(name, tmp_path):
    args = _args(name, tmp_path, "--seeds", "0", "--eval-size", "0", "--set", "optim.weight_decay=0.01")
    args.seeds = [0]
    E.run_experiment(args, log=lambda m: None)
    out = tmp_path / name
    assert (out / "results.json").is_file() and (out / "results.md").is_file() and (out / "results.png").is_file()
    # the notes name the --set overrides and say "all the" test images for --eval-size 0, never "None"
    md = (out / "results.md").read_text()
    assert "Every run also has optim.weight_decay=0.01 (--set" in md and "None" not in md
    assert name == "best_fashion_mnist" or "all the" in md


def test_time_budget_ends_a_run_inside_an_epoch(tmp_path):
    args = _args("best_fashion_mnist", tmp_path, "--budget-min", "1e-6")
    assert E.plan_best_fashion_mnist(args).arms[0].recipe["time_budget_min"] == 1e-6
    arm = E.plan_quick(E.plan_best_fashion_mnist, args).arms[0]
    assert "time_budget_min" not in arm.recipe  # --quick runs its epoch whole
    arm.recipe.update(epochs=3, threads=1, time_budget_min=1e-6)
    res = E.run_arm(arm, 0, tmp_path / "b", device="cpu", fresh=False, log=lambda m: None)
    assert res["steps"] == 1 and res["epochs"] == 0.5  # one step of two, then the deadline
    assert res["curve"] == [(0.5, res["test_top1"])]  # evaluated where it stopped
    summary = json.loads((tmp_path / "b" / "runs" / "nest-best-s0" / "summary.json").read_text())
    assert summary["stopped_by_budget"] and summary["time_budget_s"] == pytest.approx(6e-5)


def test_a_finished_run_is_reused_only_for_the_same_config(tmp_path):
    args = _args("best_fashion_mnist", tmp_path)
    arm = E.plan_quick(E.plan_best_fashion_mnist, args).arms[0]
    arm.recipe.update(epochs=1, threads=1)
    said: list[str] = []
    first = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=said.append)
    again = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=said.append)
    assert not first["read_back"] and again["read_back"]
    saved = tmp_path / "runs" / "nest-best-s0" / "config.yaml"
    assert "progress: false" in saved.read_text()
    saved.write_text(saved.read_text().replace("progress: false", "progress: true"))  # as `nestvit train` ran it
    shown = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=said.append)
    assert shown["read_back"] and shown["test_top1"] == first["test_top1"]
    thread = E.run_arm(E.Arm(arm.name, E._merge(arm.recipe, {"threads": 2}), arm.labels), 0, tmp_path, device="cpu",
                       fresh=False, log=said.append)  # another thread count: the same run
    assert thread["read_back"]
    arm.recipe = E._merge(arm.recipe, {"optim": {"lr": 1e-4}})  # the recipe changed since: train again
    changed = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=said.append)
    assert not changed["read_back"] and any("another config" in m for m in said)


def test_a_committed_run_record_is_read_back_without_weights(tmp_path):
    """A study whose --out is in the repository commits what its .gitignore keeps; a fresh clone reads it back."""
    ignore = Path(__file__).resolve().parents[1] / "experiments/results/rtnt_paper_fashion_mnist/.gitignore"
    kept = {line.split("/")[-1] for line in ignore.read_text().splitlines() if line.startswith("!/runs/*/")}
    assert {"config.yaml", "summary.json", "metrics.jsonl"} <= kept
    args = _args("best_fashion_mnist", tmp_path)
    arm = E.plan_quick(E.plan_best_fashion_mnist, args).arms[0]
    arm.recipe.update(epochs=1, threads=1)
    first = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=lambda m: None)
    run_dir = tmp_path / "runs" / "nest-best-s0"
    for f in run_dir.iterdir():
        if f.name not in kept:  # weights, state.pt, plots: not committed
            f.unlink()
    again = E.run_arm(arm, 0, tmp_path, device="cpu", fresh=False, log=lambda m: None)
    assert again["read_back"] and not (run_dir / "last.safetensors").exists()
    assert {k: again[k] for k in ("test_top1", "steps", "curve", "wall_s")} == \
        {k: first[k] for k in ("test_top1", "steps", "curve", "wall_s")}


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    from nestvit.train.config import TrainConfig, from_dict
    from nestvit.train.loop import train

    args = _args("best_fashion_mnist", tmp_path)
    arm = E.plan_quick(E.plan_best_fashion_mnist, args).arms[0]
    arm.recipe.update(epochs=2, threads=1)
    whole = E.run_arm(arm, 0, tmp_path / "whole", device="cpu", fresh=False, log=lambda m: None)
    cfg = from_dict(TrainConfig, E._merge(arm.recipe, {"seed": 0, "progress": False}))
    run_dir = tmp_path / "cut" / "runs" / "nest-best-s0"
    train(cfg, run_dir, device="cpu", stop_after_epochs=1)
    (run_dir / "summary.json").unlink()  # as if killed after its first epoch's checkpoint
    said: list[str] = []
    resumed = E.run_arm(arm, 0, tmp_path / "cut", device="cpu", fresh=False, log=said.append)
    assert any("resuming" in m for m in said) and not resumed["read_back"]
    assert resumed["test_top1"] == whole["test_top1"] and resumed["steps"] == whole["steps"]
    assert resumed["curve"] == whole["curve"]


@pytest.mark.parametrize(("signal_name", "status"), [("Ctrl-C", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stopped_experiment_says_to_run_its_command_again(tmp_path, monkeypatch, signal_name, status):
    from nestvit.cli import main
    from nestvit.train import Stopped

    def stopped(args, log=None):
        raise Stopped(signal_name, 7, tmp_path / "runs" / "a-s0")

    monkeypatch.setattr(E, "run_experiment", stopped)
    monkeypatch.setattr("sys.argv", ["nestvit", "experiment", "rtnt_vs_tnt", "--quick", "--out", str(tmp_path)])
    with pytest.raises(Stopped, match=r"at step 7; .*a-s0: continue it with the same command \(nestvit experiment "
                                      r"rtnt_vs_tnt --quick --out .*\)$"):
        E.run(build_parser().parse_args(["experiment", "rtnt_vs_tnt", "--quick", "--out", str(tmp_path)]))
    assert main(["experiment", "rtnt_vs_tnt", "--quick", "--out", str(tmp_path)]) == status  # 128 + signum


def test_rtnt_runs_of_the_papers_size_checkpoint_inside_epochs():
    args = _args("rtnt_vs_tnt", Path("."), "--depth", "12", "--epochs", "5")
    plan = E.plan_rtnt_vs_tnt(args)
    assert all(a.recipe["checkpoint_every"] == 200 and a.recipe["model"]["overrides"]["depth"] == 12
               and a.recipe["compile"] and a.recipe["precision"] == "fp32" for a in plan.arms)
    assert "The paper's depth" in plan.notes[1]


def test_epochs_and_steps_show_a_range_when_a_budget_stopped_seeds_apart():
    assert E._span([22, 22]) == 22 and E._span([22, 20]) == "20-22" and E._span([None, 7]) == 7 and E._span([]) is None


def test_best_fashion_mnist_adds_a_column_per_tta_from_the_last_weights(tmp_path, capsys, monkeypatch):
    from nestvit.cli import main

    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)  # precision auto: fp32 on any CPU

    def args(*extra: str):  # views scored after the run (the recipe scores flip-shift inside its budget)
        return _args("best_fashion_mnist", tmp_path, "--set", "tta=none", *extra)

    result = E.run_experiment(args(), log=lambda m: None)
    assert list(result["tta"]) == ["flip", "flip-shift"]
    runs, (row,) = result["runs"], result["rows"]
    for mode in ("flip", "flip-shift"):
        assert row["tta"][mode]["n"] == 2
        assert math.isclose(row["tta"][mode]["mean"], sum(r["tta"][mode] for r in runs) / 2)
    md = (tmp_path / "best_fashion_mnist" / "results.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| model"))
    assert head.index("with flip TTA (2 views; min-max)") < head.index("with flip-shift TTA (18 views; min-max)")
    assert "--tta flip --precision fp32`" in md and "--tta flip-shift --precision fp32`" in md
    assert "(1 thread(s) per run, fp32)" in md and all(r["precision"] == "fp32" for r in runs)
    run_dir = Path(runs[0]["run_dir"])
    for mode in ("flip", "flip-shift"):
        cached = json.loads((run_dir / f"tta_{mode}.json").read_text())
        assert cached["top1"] == runs[0]["tta"][mode] and cached["count"] == 32
        capsys.readouterr()  # the number is the eval command's
        assert main(["eval", str(run_dir), "--weights", "last", "--tta", mode, "--precision", "auto",
                     "--limit", "32"]) == 0
        assert f"top-1 {cached['top1']:.2f}%" in capsys.readouterr().out
    # read back: the cached number, not a new evaluation
    (run_dir / "tta_flip-shift.json").write_text(json.dumps({**cached, "top1": 12.5}))
    again = E.run_experiment(args(), log=lambda m: None)
    assert again["runs"][0]["read_back"] and again["runs"][0]["tta"]["flip-shift"] == 12.5
    # --tta picks the columns; none drops them
    only = E.run_experiment(args("--tta", "flip-shift", "flip-shift"),
                            log=lambda m: None)  # a mode given twice makes one column
    assert list(only["runs"][0]["tta"]) == ["flip-shift"] and list(only["rows"][0]["tta"]) == ["flip-shift"]
    assert (tmp_path / "best_fashion_mnist" / "results.md").read_text().count("with flip-shift TTA (18 views") == 1
    none = E.run_experiment(args("--tta", "none"), log=lambda m: None)
    assert none["runs"][0]["tta"] == {} and "TTA" not in (tmp_path / "best_fashion_mnist" / "results.md").read_text()
    # other experiments have no such column unless asked
    assert "TTA" not in E.markdown(E.plan_hierarchy(build_parser().parse_args(["experiment", "hierarchy"])),
                                   [], {"command": "c", "runs_wall_s": 0, "device": "cpu", "threads": 1})


def test_the_tta_column_reuses_a_runs_own_final_tta_evaluation(tmp_path):
    """The recipe's ``tta: flip-shift`` (views scored inside its budget) is not evaluated again for the column."""
    args = _args("best_fashion_mnist", tmp_path)
    args.seeds = [0]
    (run,) = E.run_experiment(args, log=lambda m: None)["runs"]
    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert summary["tta"] == "flip-shift" and run["tta"]["flip-shift"] == summary["test_top1_tta"]
    assert not (Path(run["run_dir"]) / "tta_flip-shift.json").exists()
    assert (Path(run["run_dir"]) / "tta_flip.json").is_file()  # the other column is scored after the run
    md = (tmp_path / "best_fashion_mnist" / "results.md").read_text()
    flip, flip_shift = (line for line in md.splitlines() if " TTA column: " in line)
    assert "inside its time budget (the recipe's `tta: flip-shift`)" in flip_shift
    assert "inside" not in flip
    assert re.search(r": `nestvit eval RUN --weights last --tta flip --precision \w+`\.$", flip)


def test_tta_views_script_agrees_with_the_tta_column(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "tta_views.py"
    spec = importlib.util.spec_from_file_location("tta_views", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = _args("best_fashion_mnist", tmp_path, "--seeds", "0")
    args.seeds = [0]
    (run,) = E.run_experiment(args, log=lambda m: None)["runs"]
    top1 = script.view_top1(run["run_dir"], threads=1)
    assert list(top1) == list(script.VIEW_SETS)
    assert 0 <= top1["plain"] <= 100
    assert top1["flip + 3x3 one-pixel moves (18, --tta flip-shift)"] == pytest.approx(run["tta"]["flip-shift"])
    assert top1["flip (2)"] == pytest.approx(run["tta"]["flip"])


def test_the_wall_time_line_names_the_machines_and_the_runs_without_a_record():
    assert E._machines({"machines": [], "unrecorded_machines": 3}) == ""  # published tables stay as they were
    assert E._machines({"machines": ["A, 2 CPUs"], "unrecorded_machines": 0}) == "; machine: A, 2 CPUs"
    assert E._machines({"machines": ["A, 2 CPUs", "B, 2 CPUs"], "unrecorded_machines": 1}) == (
        "; machines: A, 2 CPUs; B, 2 CPUs; 1 run without a record of it")
    two_missing = E._machines({"machines": ["A, 2 CPUs"], "unrecorded_machines": 2})
    assert two_missing.endswith("; 2 runs without a record of it")


def test_read_run_skips_a_torn_log_line(tmp_path):
    """A run read back by a later invocation keeps its epochs when the kill tore the log's last line."""
    (tmp_path / "summary.json").write_text(json.dumps({"test_top1": 90.0, "epochs": 2, "steps": 20}))
    rows = [{"kind": "step", "step": 5, "loss": 1.0},
            {"kind": "epoch", "epoch": 1, "step": 10, "test_top1": 80.0, "img_s": 100.0, "time_s": 10.0},
            {"kind": "epoch", "epoch": 2, "step": 20, "test_top1": 90.0, "img_s": 300.0, "time_s": 10.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "epo')
    run = E._read_run(tmp_path)
    assert run["curve"] == [(1, 80.0), (2, 90.0)]
    assert run["train_s"] == 20.0 and run["train_img_s"] == 200.0
    assert run["test_top1"] == 90.0 and run["steps"] == 20


def test_the_wall_time_of_a_run_resumed_by_an_older_version_counts_every_piece(tmp_path):
    import torch

    (tmp_path / "summary.json").write_text(json.dumps({"test_top1": 90.0, "wall_s": 40.0}))  # its last piece
    torch.save({"step": 20, "elapsed_s": 100.0}, tmp_path / "state.pt")
    assert E._read_run(tmp_path)["wall_s"] == 100.0


def _lever_curves():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "lever_curves.py"
    spec = importlib.util.spec_from_file_location("lever_curves", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_lever_curves_reads_the_published_logs(tmp_path, capsys):
    """The script behind section 5's curve plot parses the trainer's epoch lines in the committed logs."""
    script = _lever_curves()
    curve = script.read_log(script.PILOTS / "best_fashion_mnist_s16_lr1e-3_e20.log")
    assert curve["epoch"] == list(range(1, 21))
    assert curve["test"][-1] == 94.13 and curve["train"][-1] == 96.31 and curve["tta"] == 94.58
    logs = [f"--log=lr 1e-3={script.PILOTS / 'best_fashion_mnist_s16_lr1e-3_e20.log'}",
            f"--log=recipe={script.PILOTS / 'best_fashion_mnist_s14_ema_e20.log'}"]
    script.main([*logs, "--out", str(tmp_path / "levers.png")])
    table = capsys.readouterr().out
    assert "| lr 1e-3 | 20 | 96.3 | 94.13 | 94.58 |" in table and "| recipe | 20 | 95.9 | 93.94 | 94.49 |" in table
    assert (tmp_path / "levers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lever_curves_names_a_log_without_epoch_lines(tmp_path):
    script = _lever_curves()
    (tmp_path / "empty.log").write_text("run dir: x\nepoch 1/20:  10%|#   | 4/40 [00:02<00:18]\r")
    with pytest.raises(SystemExit, match="no per-epoch lines"):
        script.read_log(tmp_path / "empty.log")
    with pytest.raises(SystemExit, match="no log at"):
        script.read_log(tmp_path / "missing.log")


def test_lever_curves_default_runs_are_all_committed_and_complete():
    script = _lever_curves()
    for log in script.RUNS.values():
        assert script.read_log(script.PILOTS / log)["epoch"] == list(range(1, 21)), log


def _script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generation_study_compares_at_equal_steps_and_equal_cpu_time(tmp_path):
    study = _script("generation_study")

    def run(fids, cpu_per_step):
        return [{"step": s, "cpu": s * cpu_per_step, "fid": f, "kid": f / 100, "is": 1.0}
                for s, f in zip(range(0, 500 * len(fids), 500), fids)]

    curves = {"fast": {0: run([100, 50, 30, 20, 10], 0.1), 1: run([100, 60, 40, 30, 20], 0.1)},
              "slow": {0: run([100, 40, 20, 10, 5], 0.4), 1: run([100, 40, 20, 10, 5], 0.4)}}
    result = study.summarize(curves)
    assert result["cpu_budget_s"] == pytest.approx(200.0)  # the fast arm's 2,000 steps
    fast, slow = result["arms"]["fast"], result["arms"]["slow"]
    assert fast["final"]["fid"]["mean"] == pytest.approx((20 + 30) / 2)  # the mean of each seed's last three
    assert slow["fid_at_equal_cpu"]["mean"] == pytest.approx(40.0)  # 200 CPU-s = step 500 of the slow arm
    assert fast["fid_at_equal_cpu"]["mean"] == pytest.approx(15.0)
    assert fast["fid_by_step"][500]["mean"] == pytest.approx(55.0)
    md = study.markdown(result, "cmd")
    assert "| fast | 2 |" in md and "FID at 200 CPU-s" in md
    study.plot(curves, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    cfg = study.config("nest-nn-conv", 2, study.parse_args(["--steps", "5000"]), tmp_path / "f.safetensors")
    assert (cfg.generator_overrides, cfg.seed, cfg.steps) == ({"deaggregation": "nearest", "deagg_conv": True}, 2, 5000)
