"""GradCAT: a NesT whose answer is known by construction, path/box consistency, levels, batch, top-k, sign."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nestvit.explain import block_box, gradcat
from nestvit.explain._grad import intermediate_gradients
from nestvit.explain.gradcat import _quadrant_scores
from nestvit.models.nest import Nest, NestConfig


def linear_nest(num_levels: int, img_size=16, num_classes: int = 3, block_size=None, seed: int = 0) -> Nest:
    """A NesT made exactly linear and tree-structured, so GradCAT's right answer is known.

    Swin-style ``patch_merge`` aggregation merges each 2x2 group of pixels into one (no spatial mixing
    beyond the tree), the transformer layers and LayerNorms are replaced by identities, and all biases
    and position embeddings are zero. Then ``A_l(p)`` depends only on the input pixels under ``p`` and
    ``Y_c`` is linear in the input, so ``h_l(p) = A_l(p) . dY_c/dA_l(p) = sum_{i under p} r_i x_i`` with
    ``r = dY_c/dx``: each quadrant's score is exactly the class evidence of the pixels it covers.
    """
    torch.manual_seed(seed)
    cfg = NestConfig(img_size=img_size, in_chans=1, num_classes=num_classes, patch_size=1, num_levels=num_levels,
                     block_size=block_size, embed_dims=4, num_heads=1, depths=1, aggregation="patch_merge")
    m = Nest(cfg)
    with torch.no_grad():
        for level in m.levels:
            level.transformer_encoder = nn.Identity()
            level.pos_embed.zero_()
            if not isinstance(level.pool, nn.Identity):
                level.pool.norm = nn.Identity()
        m.norm = nn.Identity()
        m.patch_embed.proj.bias.zero_()
    return m.eval()


def input_gradient(model: Nest, c: int) -> torch.Tensor:
    x = torch.zeros(1, *((model.in_chans,) + tuple(model.img_size)), requires_grad=True)
    model(x)[0, c].backward()
    return x.grad[0]


def signal_in_leaf(model: Nest, c: int, leaf: int) -> torch.Tensor:
    """An input that is zero except in leaf block ``leaf`` (level 0), where it is ``dY_c/dx``:
    positive evidence for class ``c`` there and exactly none anywhere else."""
    r = input_gradient(model, c)
    x0, y0, x1, y1 = block_box(model, 0, torch.tensor(leaf)).tolist()
    x = torch.zeros_like(r)
    x[:, y0:y1, x0:x1] = r[:, y0:y1, x0:x1]
    return x


def expected_path(model: Nest, leaf: int, sign: int) -> list[int]:
    """Block indices top -> leaf that Algorithm 1 must choose for ``signal_in_leaf(leaf)``.

    sign +1: the quadrant holding the signal scores > 0, the others exactly 0 -> follow the signal.
    sign -1: the signal quadrant scores < 0 -> argmax takes the first zero quadrant (TL, or TR when the
    signal is in TL); below a node without signal every score is 0 and TL (index 0) wins the tie.
    """
    L = model.cfg.num_levels
    gw0 = model.cfg.block_grid(0)[1]
    lr, lc = leaf // gw0, leaf % gw0
    row = col = 0
    path = [0]
    on_signal = True
    for level in range(L - 1, 0, -1):
        # the signal's quadrant inside the current node, in the child grid of level - 1
        scale = 2 ** (level - 1)
        sq = 2 * ((lr // scale) % 2) + (lc // scale) % 2
        if sign > 0:
            q = sq
        else:
            q = (1 if sq == 0 else 0) if on_signal else 0
            on_signal = False
        row, col = 2 * row + q // 2, 2 * col + q % 2
        path.append(row * model.cfg.block_grid(level - 1)[1] + col)
    return path


@pytest.mark.parametrize("num_levels", [2, 3, 4])
def test_known_branch_is_chosen_and_sign_flips_it(num_levels):
    model = linear_nest(num_levels)
    n_leaves = model.cfg.block_grid(0)[0] * model.cfg.block_grid(0)[1]
    leaves = sorted({0, 1, n_leaves // 2 + 1, n_leaves - 1, n_leaves // 3})
    c = 1
    x = torch.stack([signal_in_leaf(model, c, j) for j in leaves])  # a batch: one signal leaf per image
    pos = gradcat(model, x, target=c, sign=+1)
    neg = gradcat(model, x, target=c, sign=-1)
    for b, j in enumerate(leaves):
        assert pos.path[b, 0].tolist() == expected_path(model, j, +1)
        assert pos.path[b, 0, -1] == j
        assert neg.path[b, 0].tolist() == expected_path(model, j, -1)
        assert neg.path[b, 0, -1] != j  # flipping the sign moves the leaf off the evidence
        # the chosen quadrant carries all the evidence: three scores exactly zero at every level
        s = pos.scores[b, 0]
        assert torch.all((s > 0).sum(dim=1) == 1) and torch.all((s != 0).sum(dim=1) == 1)


@pytest.mark.parametrize("num_levels", [2, 3, 4])
def test_scores_sum_to_the_logit_on_a_linear_model(num_levels):
    """Completeness: for a bias-free linear model, sum_p h_l(p) = Y_c - b_c at every level (sign +1),
    which checks the gradients carried from the stage outputs into the maps' layout."""
    model = linear_nest(num_levels, num_classes=4)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    res = gradcat(model, x, top_k=2, sign=+1)
    logits = model(x).detach()
    bias = model.head.bias.detach()
    for k in range(2):
        want = logits.gather(1, res.classes[:, k:k + 1])[:, 0] - bias[res.classes[:, k]]
        for h in res.maps:
            torch.testing.assert_close(h[:, k].sum(dim=(1, 2)), want, rtol=1e-4, atol=1e-5)


def test_rectangular_image_starts_in_the_best_top_block():
    # 16x32 input, blocks of 4: the top level (level 2) has 1x2 blocks
    model = linear_nest(3, img_size=(16, 32), block_size=4)
    assert model.cfg.block_grid(2) == (1, 2)
    leaf = 3 * 8 + 6  # row 3, col 6 of the 4x8 leaf grid: in the right top block
    x = signal_in_leaf(model, 0, leaf)[None]
    res = gradcat(model, x, target=0, sign=+1)
    assert res.root_scores.shape == (1, 1, 2)
    assert res.path[0, 0, 0] == 1 and res.path[0, 0, -1] == leaf
    assert res.boxes[0, 0, 0].tolist() == [16, 0, 32, 16]


def nest(num_levels: int, **kw) -> Nest:
    torch.manual_seed(0)
    cfg = dict(img_size=32, in_chans=3, num_classes=5, patch_size=2, num_levels=num_levels, block_size=None,
               embed_dims=8, num_heads=2, depths=1)
    cfg.update(kw)
    return Nest(NestConfig(**cfg))


@pytest.mark.parametrize("num_levels", [2, 3, 4])
def test_path_boxes_are_nested_and_halve(num_levels):
    model = nest(num_levels)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = gradcat(model, x, top_k=3)
    L = num_levels
    assert res.path.shape == (3, 3, L) and res.boxes.shape == (3, 3, L, 4)
    assert res.scores.shape == (3, 3, L - 1, 4) and res.levels == tuple(range(L, 0, -1))
    assert [tuple(h.shape) for h in res.maps] == [(3, 3, 16 // 2 ** lv, 16 // 2 ** lv) for lv in reversed(range(L))]
    for b in range(3):
        assert len(set(res.classes[b].tolist())) == 3  # three different classes, best first
        assert torch.all(res.probs[b, :-1] >= res.probs[b, 1:])
        for k in range(3):
            boxes = res.boxes[b, k]
            assert boxes[0].tolist() == [0, 0, 32, 32]
            for i in range(1, L):
                parent, child = boxes[i - 1], boxes[i]
                assert child[0] >= parent[0] and child[1] >= parent[1]
                assert child[2] <= parent[2] and child[3] <= parent[3]
                assert (child[2] - child[0]) * 2 == parent[2] - parent[0]
                assert (child[3] - child[1]) * 2 == parent[3] - parent[1]
                # the child is the quadrant the scores chose
                q = int(res.choice[b, k, i - 1])
                assert q == int(res.scores[b, k, i - 1].argmax())
                half = (parent[2] - parent[0]) // 2
                assert child[0] == parent[0] + (q % 2) * half and child[1] == parent[1] + (q // 2) * half
                code_level = L - 1 - i
                assert boxes[i].tolist() == block_box(model, code_level, res.path[b, k, i]).tolist()
            assert res.leaf_boxes[b, k].tolist() == boxes[-1].tolist()
            assert boxes[-1, 2] - boxes[-1, 0] == model.cfg.block * model.cfg.patch_size


def test_five_levels_and_single_image_target_forms():
    model = nest(5, img_size=64, patch_size=2, embed_dims=4, num_heads=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    a = gradcat(model, x, target=3)
    b = gradcat(model, x, target=torch.tensor([3, 3]))
    c = gradcat(model, x, target=torch.tensor([[3], [3]]))
    assert a.path.shape == (2, 1, 5)
    assert torch.equal(a.path, b.path) and torch.equal(a.path, c.path)
    assert torch.all(a.classes == 3)


def test_top_k_equals_separate_runs_and_batch_equals_single():
    model = nest(3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    top = gradcat(model, x, top_k=2)
    for k in range(2):
        single = gradcat(model, x, target=top.classes[:, k])
        assert torch.equal(single.path[:, 0], top.path[:, k])
        torch.testing.assert_close(single.scores[:, 0], top.scores[:, k])
    one = gradcat(model, x[1:2], top_k=2)
    assert torch.equal(one.path[0], top.path[1])


def test_top_map_normalized_is_the_cam_and_raw_is_degenerate():
    model = nest(3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    res = gradcat(model, x, target=torch.tensor([0, 1]), sign=+1)
    feats = model.forward_features(x).detach()
    cam = torch.einsum("bchw,bc->bhw", feats, model.head.weight[torch.tensor([0, 1])].detach())
    torch.testing.assert_close(res.maps[0][:, 0], cam / cam[0].numel(), rtol=1e-4, atol=1e-6)
    raw = gradcat(model, x, target=torch.tensor([0, 1]), sign=+1, top="raw")
    assert raw.maps[0].abs().max() < 1e-3 * res.maps[0].abs().max()  # LayerNorm is scale invariant


def test_gradients_match_a_manual_forward_through_the_levels():
    model = nest(3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    classes, _, maps, grads = intermediate_gradients(model, x, lambda logits: logits.argmax(1, keepdim=True))
    h = model._embed(x)
    outs = []
    for level in model.levels:
        h = level(h)
        outs.append(h)
    logits = model.forward_head(model.norm(h).permute(0, 3, 1, 2))
    want = torch.autograd.grad(logits.gather(1, classes).sum(), outs)
    for g, w in zip(grads[0], want):
        torch.testing.assert_close(g, w.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-7)
    assert model.training is False


def test_restores_training_mode_and_refuses_other_models():
    import nestvit

    model = nest(2).train()
    gradcat(model, torch.randn(1, 3, 32, 32))
    assert model.training
    vit = nestvit.create_model("vit_tiny_patch4_32", img_size=16, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="GradCAT"):
        gradcat(vit, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="sign"):
        gradcat(model, torch.randn(1, 3, 32, 32), sign=0)
    with pytest.raises(ValueError, match="target"):
        gradcat(model, torch.randn(1, 3, 32, 32), target=7)


def test_odd_blocks_split_the_middle_by_area():
    region = torch.arange(9.0).reshape(1, 3, 3)
    q = _quadrant_scores(region)
    # TL covers rows/cols [0, 1.5): pixels 0,1,3,4 fully and halves of 2,5,6,7 and a quarter of 8... by area
    up = region.repeat_interleave(2, -1).repeat_interleave(2, -2)[0]
    want = torch.stack([up[:3, :3].mean(), up[:3, 3:].mean(), up[3:, :3].mean(), up[3:, 3:].mean()])
    torch.testing.assert_close(q[0], want)
    assert q[0].mean() == region.mean()
