"""The training loss: DeiT distillation's math, class weights, and a conv-net teacher training NesT and
distilled-ViT students."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestvit.train.distill import SmallConvNet, balanced_class_weights, classification_loss, distillation_term
from nestvit.train.loop import train

TINY_VIT = {"patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 1}


def test_hard_distillation_math():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    onehot = F.one_hot(labels, 5).float()
    loss = classification_loss(student, onehot, teacher, kind="hard", alpha=0.3)
    expect = 0.7 * F.cross_entropy(student, labels) + 0.3 * F.cross_entropy(student, teacher.argmax(1))
    torch.testing.assert_close(loss, expect)


def test_balanced_class_weights_are_pytorchs_weighted_cross_entropy():
    labels = torch.tensor([0] * 6 + [1] * 2 + [3] * 4)  # class 2 has no images
    w = balanced_class_weights(labels, 4)
    torch.testing.assert_close(w, torch.tensor([12 / (3 * 6), 12 / (3 * 2), 0.0, 12 / (3 * 4)]))  # K = 3 with images
    assert w[labels].mean().item() == pytest.approx(1.0)  # the loss keeps its scale on the training split
    torch.manual_seed(2)
    logits = torch.randn(5, 4)
    soft = F.softmax(torch.randn(5, 4), 1)  # mixup / label smoothing targets
    torch.testing.assert_close(classification_loss(logits, soft, class_weights=w),
                               F.cross_entropy(logits, soft, weight=w))
    hard = torch.tensor([0, 1, 3, 3, 1])
    torch.testing.assert_close(classification_loss(logits, F.one_hot(hard, 4).float(), class_weights=w),
                               (F.cross_entropy(logits, hard, reduction="none") * w[hard]).mean())


def test_soft_distillation_math():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    tau = 2.0
    p_t = F.softmax(teacher / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / tau, 1))).sum(1).mean() * tau * tau
    torch.testing.assert_close(distillation_term(student, teacher, kind="soft", tau=tau), kl)
    assert distillation_term(teacher, teacher, kind="soft", tau=tau).abs() < 1e-6


def test_two_heads_split_the_work():
    torch.manual_seed(2)
    cls, dist, teacher = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    targets = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    loss = classification_loss((cls, dist), targets, teacher, kind="hard", alpha=0.5)
    expect = 0.5 * F.cross_entropy(cls, targets.argmax(1)) + 0.5 * F.cross_entropy(dist, teacher.argmax(1))
    torch.testing.assert_close(loss, expect)
    # without a teacher both heads learn the labels
    no_teacher = classification_loss((cls, dist), targets)
    torch.testing.assert_close(no_teacher, (F.cross_entropy(cls, targets.argmax(1))
                                            + F.cross_entropy(dist, targets.argmax(1))) / 2)


def test_small_convnet_contract():
    net = SmallConvNet(in_chans=1, num_classes=7, widths=(8, 16))
    x = torch.randn(2, 1, 12, 10)
    assert net(x).shape == (2, 7)
    assert net.forward_features(x).shape == (2, 16, 6, 5)
    feats, maps = net.forward_intermediates(x)
    assert len(maps) == 2 and net.no_weight_decay() == set()
    net.reset_classifier(3)
    assert net(x).shape == (2, 3)
    with pytest.raises(TypeError, match="unknown option"):
        SmallConvNet(width=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, make_config):
    """A SmallConvNet trained for one epoch on the tiny synthetic set."""
    run = tmp_path_factory.mktemp("teacher")
    train(make_config("epochs=1", "model.name=convnet", "model.overrides={widths: [8, 16]}"), run / "run")
    return run / "run" / "last.safetensors"


@pytest.mark.parametrize("student", ["nest", "vit_distilled"])
def test_distillation_trains(tmp_path, make_config, teacher, student):
    sets = ["epochs=1", "distill.teacher=convnet", f"distill.teacher_weights={teacher}",
            "distill.teacher_overrides={widths: [8, 16]}", f"distill.type={'hard' if student == 'nest' else 'soft'}"]
    if student == "vit_distilled":
        sets += ["model.name=vit_tiny_patch4_32", "model.overrides={patch_size: 2, embed_dim: 16, depth: 1, "
                                                  "num_heads: 1, distilled: true}"]
    result = train(make_config(*sets), tmp_path / "student")
    assert result.steps == 4 and 0 <= result.test.top1 <= 100


def test_teacher_weights_must_fit(tmp_path, make_config, teacher):
    cfg = make_config("distill.teacher=convnet", f"distill.teacher_weights={teacher}")
    with pytest.raises(ValueError, match="does not fit"):  # default widths (32, 64, 128) != the file's
        train(cfg, tmp_path / "s")


def test_a_transformer_teacher_of_another_size_is_one_clear_error(tmp_path, make_config):
    # before: "does not fit Nest: ... pos_embed ... create_model(NAME, pretrained=PATH)", advice for fine-tuning
    from nestvit.config import ConfigError

    train(make_config("epochs=1"), tmp_path / "nest8")
    with pytest.raises(ConfigError, match=r"cannot teach the student's 16x16x1 images \(.* does not fit Nest: 2 with "
                                          r"another shape \(e\.g\. .*\); a teacher sees .*distil from one trained at"):
        train(make_config("epochs=1", f"distill.teacher_weights={tmp_path / 'nest8'}", "data.pad_to=16"),
              tmp_path / "s16")


def test_the_teacher_comes_from_its_weights_and_is_checked_against_the_data(tmp_path, make_config, teacher, capsys):
    # before: teacher_weights without distill.teacher silently trained without a teacher
    result = train(make_config("epochs=1", f"distill.teacher_weights={teacher.parent}"), tmp_path / "s")
    assert result.steps == 4 and "distilling from convnet (hard, alpha 0.5)" in capsys.readouterr().out
    # another input size than the teacher was trained on: said, not silent
    train(make_config("epochs=1", f"distill.teacher_weights={teacher}", "data.pad_to=16"), tmp_path / "s2")
    assert "warning: the teacher was trained on 8x8 images" in capsys.readouterr().out
    # another class count: one line naming both
    from nestvit.contract import RunContract, read_contract
    from nestvit.interop import save_weights
    from nestvit.registry import create_model

    c = read_contract(teacher)
    kwargs = {**c.kwargs, "num_classes": 5}
    weights = save_weights(create_model("convnet", **kwargs), tmp_path / "five" / "best.safetensors",
                           contract=RunContract(model="convnet", kwargs=kwargs, classes=tuple("abcde"),
                                                transform=c.transform))
    with pytest.raises(ValueError, match=r"distill.teacher_weights .* has 5 classes \(a, b, c, d, e\); the student's "
                                         r"data has 10"):
        train(make_config("epochs=1", f"distill.teacher_weights={weights}"), tmp_path / "s3")
    # the data's classes in another order: the teacher's head rows follow the names
    reordered = save_weights(create_model("convnet", **c.kwargs), tmp_path / "rev" / "best.safetensors",
                             contract=RunContract(model="convnet", kwargs=c.kwargs, classes=tuple(c.classes[::-1]),
                                                  transform=c.transform))
    capsys.readouterr()
    train(make_config("epochs=1", f"distill.teacher_weights={reordered}"), tmp_path / "s4")
    assert "distill.teacher_weights: head: rows reordered to this data's class order" in capsys.readouterr().out
