"""Localization metrics on hand-made boxes and maps; box readers on written files; the synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestvit.explain import (
    THRESHOLDS,
    gt_known_loc_acc,
    iou,
    largest_component,
    make_localization_set,
    map_to_box,
    read_boxes_csv,
    read_voc_xml,
    search_threshold,
    top1_loc_error,
)


def test_iou_exact_values():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no pixel (half-open)
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert iou((0, 0, 2, 2), (5, 5, 6, 6)) == 0.0
    assert iou((3, 3, 3, 8), (0, 0, 10, 10)) == 0.0  # empty box
    got = iou(np.array([[0, 0, 10, 10], [0, 0, 4, 4]]), np.array([[0, 0, 5, 10], [2, 2, 6, 6]]))
    np.testing.assert_allclose(got, [0.5, 4 / 28])


def test_largest_component_4_vs_8_connectivity():
    m = np.zeros((8, 8), dtype=bool)
    m[0:2, 0:2] = True  # 4 pixels
    m[2, 2] = m[3, 3] = m[4, 4] = True  # a diagonal chain touching the square only at corners
    m[5:8, 6:8] = True  # 6 pixels, separate
    eight = largest_component(m, 8)
    assert eight.sum() == 7 and eight[0, 0] and eight[4, 4] and not eight[6, 6]
    four = largest_component(m, 4)
    assert four.sum() == 6 and four[6, 6] and not four[0, 0]
    assert not largest_component(np.zeros((3, 3), bool)).any()


def test_largest_component_follows_a_long_snake():
    # a one-pixel-wide snake (rows 0, 2, 4, ... joined at alternating ends): 170 pixels whose labels must
    # travel the whole length, next to a compact 10x10 blob (100 pixels) that looks bigger
    m = np.zeros((17, 40), dtype=bool)
    for r in range(0, 17, 2):
        m[r, 0:18] = True
        if r + 2 < 17:
            m[r + 1, 17 if (r // 2) % 2 == 0 else 0] = True
    m[3:13, 22:32] = True
    snake = m.copy()
    snake[:, 20:] = False
    comp = largest_component(m, 4)
    assert snake.sum() == 170
    np.testing.assert_array_equal(comp, snake)


def test_map_to_box_picks_the_largest_blob_after_normalising():
    cam = np.zeros((20, 30))
    cam[2:6, 3:9] = 5.0  # 24 px, strong
    cam[10:18, 15:27] = 4.0  # 96 px, a bit weaker
    cam[0, 29] = 5.0  # a single hot pixel
    assert map_to_box(cam, 0.5) == (15, 10, 27, 18)
    assert map_to_box(cam, 0.9) == (3, 2, 9, 6)  # only the 5.0 regions survive; the block beats the pixel
    assert map_to_box(torch.tensor(cam + 100.0), 0.5) == (15, 10, 27, 18)  # min-max normalisation
    assert map_to_box(np.ones((5, 7)), 0.5) == (0, 0, 7, 5)  # a flat map: the whole image


def test_loc_accuracies_and_errors():
    gt = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 4, 4]])
    pred = np.array([[0, 0, 10, 10], [10, 10, 15, 20], [0, 0, 4, 2]])  # IoU 1, 0.5, 0.5
    assert gt_known_loc_acc(pred, gt) == 1.0
    assert gt_known_loc_acc(pred + np.array([0, 0, 0, -1]), gt) == pytest.approx(1 / 3)
    assert top1_loc_error([1, 2, 3], [1, 2, 0], pred, gt) == pytest.approx(1 / 3)
    # several ground-truth boxes per image (ImageNet): any one suffices
    multi = [np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([[10, 10, 20, 20]]), np.zeros((0, 4))]
    assert gt_known_loc_acc(pred, multi) == pytest.approx(2 / 3)


def test_threshold_search_finds_the_threshold_that_fits():
    # a Gaussian bump: a low threshold gives a box too large, a high one too small
    yy, xx = np.mgrid[0:32, 0:32]
    cams, gts = [], []
    for cx in (10, 16, 22):
        cams.append(np.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / (2 * 5.0 ** 2)))
        r = 5  # the box of the 1-sigma disc
        gts.append((cx - r, 16 - r, cx + r + 1, 16 + r + 1))
    best, accs = search_threshold(cams, np.array(gts))
    assert list(accs) == [float(t) for t in THRESHOLDS] and THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95
    assert accs[best] == 1.0 and accs[0.05] < 1.0 and accs[0.95] < 1.0
    assert 0.3 <= best <= 0.7  # exp(-1/2) = 0.61 is the exact edge; IoU >= 0.5 allows a band
    assert best == min(t for t, a in accs.items() if a == 1.0)  # ties: the smallest threshold


def test_read_voc_xml(tmp_path):
    xml = tmp_path / "n01440764_10026.xml"
    xml.write_text("""<annotation><folder>n01440764</folder><filename>n01440764_10026</filename>
<size><width>250</width><height>250</height><depth>3</depth></size>
<object><name>n01440764</name><bndbox><xmin>77</xmin><ymin>1</ymin><xmax>250</xmax><ymax>178</ymax></bndbox></object>
<object><name>n01440764</name><bndbox><xmin>1</xmin><ymin>10</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
</annotation>""")
    a = read_voc_xml(xml)
    assert a["filename"] == "n01440764_10026" and a["size"] == (250, 250)
    np.testing.assert_array_equal(a["boxes"], [[76, 0, 250, 178], [0, 9, 20, 30]])
    assert a["labels"] == ["n01440764", "n01440764"]
    np.testing.assert_array_equal(read_voc_xml(xml, one_based=False)["boxes"][0], [77, 1, 250, 178])
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><bndbox><xmin>a</xmin></bndbox></object>")
    with pytest.raises(ValueError, match="bad.xml"):
        read_voc_xml(bad)


def test_read_boxes_csv(tmp_path):
    f = tmp_path / "boxes.csv"
    f.write_text("filename,x0,y0,x1,y1,label\na.png,1,2,30,40,cat\nb.png,0,0,5,5\na.png,3,3,9,9,dog\n\n")
    boxes = read_boxes_csv(f)
    assert list(boxes) == ["a.png", "b.png"]
    np.testing.assert_array_equal(boxes["a.png"]["boxes"], [[1, 2, 30, 40], [3, 3, 9, 9]])
    assert boxes["a.png"]["labels"] == ["cat", "dog"] and boxes["b.png"]["labels"] == [""]
    (tmp_path / "short.csv").write_text("a.png,1,2\n")
    with pytest.raises(ValueError, match="short.csv:1"):
        read_boxes_csv(tmp_path / "short.csv")


def test_synthetic_set_boxes_are_tight_and_deterministic():
    g = torch.Generator().manual_seed(0)
    items = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    for i in range(5):
        items[i, 0, 4 + i:20, 6:22 - i] = 200 + i  # a bright rectangle per item
    labels = torch.arange(5)
    x, y, b = make_localization_set(n=20, items=(items, labels), clutter=False, seed=3)
    x2, y2, b2 = make_localization_set(n=20, items=(items, labels), clutter=False, seed=3)
    assert torch.equal(x, x2) and torch.equal(b, b2) and torch.equal(y, y2)
    assert x.shape == (20, 1, 64, 64) and x.dtype == torch.uint8
    for i in range(20):
        ys, xs = torch.nonzero(x[i, 0] >= 48, as_tuple=True)
        assert b[i].tolist() == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    xc, yc, bc = make_localization_set(n=20, items=(items, labels), clutter=True, seed=3, channels=3)
    assert xc.shape == (20, 3, 64, 64) and torch.equal(yc, y) and torch.equal(bc, b)  # clutter leaves the boxes
    assert (xc[:, 0] > 0).float().mean() > (x[:, 0] > 0).float().mean()
    del g


def test_synthetic_set_from_fashion_mnist():
    try:
        x, y, b = make_localization_set("fashion_mnist", 8, split="test", seed=0)
    except Exception as e:  # noqa: BLE001 - the data set is optional on a test machine
        pytest.skip(f"fashion_mnist not available: {e}")
    assert x.shape == (8, 1, 64, 64) and y.max() < 10
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (w > 4).all() and (h > 4).all() and (w <= 44).all() and (h <= 44).all()
