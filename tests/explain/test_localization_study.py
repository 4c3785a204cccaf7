"""experiments/localization.py: its metric helpers on hand-made maps and boxes (fast), and a --quick smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import nestvit
from nestvit.explain import gradcat

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "localization.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("localization_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_confidence_interval_is_a_student_t_interval(study):
    s = study.mean_ci([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert s["half"] == pytest.approx(4.303 / math.sqrt(3))
    assert s["ci95"] == pytest.approx([2.0 - 4.303 / math.sqrt(3), 2.0 + 4.303 / math.sqrt(3)])
    assert study.mean_ci([0.5])["half"] is None and study.mean_ci([0.5])["mean"] == 0.5
    assert study.mean_ci([0.2, 0.2, 0.2])["half"] == 0.0
    assert study.t_quantile_975(1) == pytest.approx(12.706)
    assert study.t_quantile_975(30) == pytest.approx(2.042)
    assert study.t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)  # the expansion beyond the table
    assert study.t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError):
        study.t_quantile_975(0)


def test_oracle_ceiling_on_known_boxes(study):
    aligned = np.array([[16, 16, 48, 48]], dtype=float)  # exactly the middle 2x2 cells of a 4x4 grid
    frac = study.cell_fractions(aligned, 4)
    assert frac[0].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert study.cell_box_ceiling(aligned, 4) == 1.0
    assert study.oracle_ceiling(aligned, 4)["oracle"] == 1.0
    # a 10x10 box in a corner: no rectangle of whole 16 px cells reaches IoU 0.5 (best 100/256), but the
    # upsampled oracle map, thresholded high, draws a box close enough
    corner = np.array([[0, 0, 10, 10]], dtype=float)
    assert study.cell_fractions(corner, 4)[0, 0, 0] == pytest.approx(100 / 256)
    assert study.cell_box_ceiling(corner, 4) == 0.0
    assert study.cell_box_ceiling(corner, 8) == 1.0  # 8 px cells: the 2x2 cells (0,0,16,16) have IoU 100/256 < 0.5,
    # ... but one 8 px cell (0,0,8,8) has IoU 64/100
    assert study.oracle_ceiling(corner, 4)["oracle"] == 1.0
    # fractions are areas: they sum to the box's area in cells
    boxes = np.array([[3, 5, 40, 29], [0, 0, 64, 64]], dtype=float)
    sums = study.cell_fractions(boxes, 8).sum((1, 2))
    assert sums == pytest.approx([(37 * 24) / 64, 64.0])


def test_polarity(study):
    gt = np.array([[8, 8, 24, 24], [40, 40, 60, 60]], dtype=float)
    m = torch.zeros(2, 64, 64)
    m[0, 8:24, 8:24] = 1.0  # high on the object
    m[1, 0:10, 0:10] = 1.0  # high off the object
    assert study.polarity(m, gt) == 0.5
    assert study.polarity(-m, gt) == 0.5
    assert study.polarity(m[:1], gt[:1]) == 1.0 and study.polarity(-m[:1], gt[:1]) == 0.0
    assert study.polarity(torch.ones(1, 64, 64), gt[:1]) == 0.0  # a constant map is not higher inside


def test_quadrants_follow_gradcats_order(study):
    q = study.quadrants(np.array([[0, 0, 64, 64]]))[0]
    assert q.tolist() == [[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]]
    # on a real traversal, each next path node is the chosen quadrant of the previous one
    torch.manual_seed(0)
    model = nestvit.create_model("nest_tiny_cifar", img_size=64, in_chans=1, num_classes=3, patch_size=4, num_levels=3,
                                 embed_dims=(8, 8, 8), num_heads=(1, 1, 1), depths=(1, 1, 1)).eval()
    r = gradcat(model, torch.randn(5, 1, 64, 64), target=torch.tensor([0, 1, 2, 0, 1]), keep_maps=False)
    boxes, choice = r.boxes[:, 0].numpy(), r.choice[:, 0].numpy()
    for k in range(boxes.shape[1] - 1):
        assert np.array_equal(study.quadrants(boxes[:, k])[np.arange(5), choice[:, k]], boxes[:, k + 1])


def test_step_accuracy_on_a_constructed_traversal(study):
    node = np.array([[0, 0, 64, 64]] * 4, dtype=float)
    cand = study.quadrants(node)
    gt = np.array([[40, 4, 60, 20],   # wholly in the top-right quadrant
                   [40, 4, 60, 20],
                   [24, 4, 40, 20],   # split evenly between top-left and top-right: both best, neither a majority
                   [24, 4, 40, 20]], dtype=float)
    chosen = np.array([1, 0, 0, 3])
    s = study.step_accuracy(cand, chosen, gt)
    assert s["n"] == 4 and s["nominal"] == 0.25
    assert s["best"] == pytest.approx(2 / 4)  # right: image 0 (the only best), image 2 (a tied best)
    assert s["best_chance"] == pytest.approx((1 / 4 + 1 / 4 + 2 / 4 + 2 / 4) / 4)
    assert s["majority"] == pytest.approx(1 / 4)
    assert s["majority_chance"] == pytest.approx((1 / 4 + 1 / 4 + 0 + 0) / 4)
    # a node that holds none of the object does not count; with none left the step is undefined
    far = study.quadrants(np.array([[0, 0, 16, 16]], dtype=float))
    s = study.step_accuracy(np.concatenate([cand[:1], far]), np.array([1, 0]), np.concatenate([gt[:1], gt[:1]]))
    assert s["n"] == 1 and s["best"] == 1.0
    assert study.step_accuracy(far, np.array([2]), gt[:1])["best"] is None


def test_pooling_to_a_common_grid_keeps_the_mean(study):
    m = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    p = study.to_grid(m, 4)
    assert p.shape == (2, 4, 4) and p[0, 0, 0] == m[0, :2, :2].mean()
    assert torch.allclose(p.mean((1, 2)), m.mean((1, 2)))
    assert study.to_grid(m, 8) is m
    with pytest.raises(ValueError):
        study.to_grid(m, 3)


def test_variants_are_config_options(study):
    def cfg(variant):
        return nestvit.create_model(study.NEST[0], **{**study.NEST[1], **study.VARIANTS[variant][0]}).cfg
    base, p2, local = cfg("base"), cfg("patch2"), cfg("local-top")
    top = lambda c: c.num_levels - 1  # noqa: E731
    assert base.block_grid(top(base)) == (1, 1) and base.block * base.patch_size == 16  # one global top block
    assert p2.block_grid(top(p2)) == (1, 1) and p2.grid[0] // 2 ** top(p2) == 8  # 8x8 top map
    assert local.block_grid(top(local)) == (2, 2) and local.block == 2  # top: 2x2 local blocks
    assert local.grid[0] // 2 ** top(local) == 4 and local.block * local.patch_size == 8
    assert study.parse_args(["--variant", "long"]).epochs == 36
    assert study.parse_args([]).seeds == [0, 1, 2]


def test_quick_smoke_run_then_reads_its_weights_back(study, tmp_path, capsys, one_thread):
    try:
        from nestvit.data import load_dataset

        load_dataset("fashion_mnist", split="test")
    except Exception as e:  # noqa: BLE001 - the data set is optional on a test machine
        pytest.skip(f"fashion_mnist not available: {e}")
    common = ["--quick", "--run-dir", str(tmp_path), "--train-size", "128", "--test-size", "24", "--examples", "2"]
    assert study.main(common + ["--seeds", "0", "1", "--skip-untrained"]) == 0
    out = json.loads((tmp_path / "quick" / "explain_localization_base.json").read_text())
    s = out["summary"]
    assert s["nest.accuracy"]["n"] == 2 and s["nest.accuracy"]["half"] is not None
    for key in ("nest.gradcat.sign-1.leaf_hit50", "nest.gradcat.sign+1.leaf_hit50",
                "nest.gradcat.sign-1.steps.L3->L2.best_chance", "nest.cam.polarity", "nest.cam.negated.gt_known",
                "nest.occlusion.gt_known", "vit.occlusion.polarity", "vit.rollout@common.gt_known", "oracle.4x4.oracle",
                "oracle.8x8.cell_box"):
        assert 0.0 <= s[key]["mean"] <= 1.0, key
    assert out["per_seed"][0]["trained"]["common_grid"] == 4
    assert (tmp_path / "quick" / "base" / "seed1" / "nest.safetensors").exists()
    assert (tmp_path / "quick" / "img" / "explain_localization_base_examples.png").exists()
    capsys.readouterr()
    assert study.main(common + ["--seeds", "1", "--skip-untrained", "--eval-only"]) == 0
    log = capsys.readouterr().out
    assert "training nest" not in log and "training vit" not in log and "read back from" in log
    again = json.loads((tmp_path / "quick" / "explain_localization_base.json").read_text())
    assert again["per_seed"][0]["trained"] == out["per_seed"][1]["trained"]  # same weights, same canvases
    capsys.readouterr()
    saved = tmp_path / "quick" / "explain_localization_base.json"
    assert study.main(["--report", "base", "--out-json", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "| GradCAT sign -1: leaf hit50 |" in table
    assert "| GradCAT sign +1: step 64->32 px, best child (chance) |" in table
    assert "| oracle map 4x4: GT-known |" in table and "(1 seeds)" in table
