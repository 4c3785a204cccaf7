"""FID / KID / IS maths against closed forms and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nestvit.contract import InputTransform
from nestvit.generate.metrics import (
    ClassifierFeatures,
    FeatureExtractor,
    FeatureNetError,
    evaluate_generator,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    get_feature_extractor,
    inception_score,
    kid,
    sqrtm_psd,
)
from nestvit.train import SmallConvNet


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fid_diagonal_closed_form():
    mu1 = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 2.5], dtype=torch.float64)
    s1 = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    # = 1 + 0 + 4 + 0.25 + (1 + 4 - 4) + (4 + 1 - 4) + (0.25 + 1 - 1) + 0 = 7.5
    assert expected == pytest.approx(7.5)
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(7.5, abs=1e-10)


def test_fid_identical_is_zero_and_symmetric():
    s = _random_spd(16, 0)
    mu = torch.randn(16, dtype=torch.float64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    s2 = _random_spd(16, 1)
    a = frechet_distance(mu, s, mu + 1, s2)
    b = frechet_distance(mu + 1, s2, mu, s)
    assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fid_random_matches_numpy_eig(seed):
    d = 24
    s1, s2 = _random_spd(d, seed), _random_spd(d, seed + 100)
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # independent path: eigenvalues of the (non-symmetric) product S1 S2 are real and >= 0
    ev = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    tr_covmean = np.sqrt(np.clip(ev.real, 0, None)).sum()
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * tr_covmean
    got = frechet_distance(torch.from_numpy(mu1), s1, torch.from_numpy(mu2), s2)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_fid_rank_deficient_covariances():
    """Fewer samples than dimensions: singular covariances must not produce NaN or complex parts."""
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(10, 32, generator=g), torch.randn(10, 32, generator=g) + 0.5
    v = fid_from_features(f1, f2)
    assert math.isfinite(v) and v > 0


def test_sqrtm_psd():
    s = _random_spd(12, 3)
    r = sqrtm_psd(s)
    assert torch.allclose(r @ r, s, atol=1e-10)
    assert torch.allclose(r, r.T)


def test_gaussian_stats_sample_fid():
    """Samples from N(0, I) and N(m, diag(4)) in 3-D: FID close to the closed form (|m|^2 + 3*(1+4-4))."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.randn(n, 3, generator=g, dtype=torch.float64)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    st = gaussian_stats(a)
    assert st.n == n and st.mu.dtype == torch.float64
    assert fid_from_features(a, b) == pytest.approx(5 + 3 * 1.0, rel=0.02)


def _mmd_loops(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_direct_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(15, 5)), rng.normal(size=(15, 5)) + 0.3
    mean, std = kid(torch.from_numpy(x), torch.from_numpy(y), num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_mmd_loops(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_unbiased_near_zero_for_same_distribution():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    same, _ = kid(x, y, num_subsets=10, subset_size=300)
    diff, _ = kid(x, y + 0.5, num_subsets=10, subset_size=300)
    assert abs(same) < 0.02 and diff > 0.05


def test_inception_score_bounds():
    K = 10
    onehot = torch.eye(K).repeat(20, 1) * 50  # confident and uniformly spread over K classes
    assert inception_score(onehot, splits=2)[0] == pytest.approx(K, rel=1e-6)
    same = torch.zeros(200, K)
    same[:, 3] = 50
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_feature_extractor_protocol_and_evaluate(tmp_path):
    torch.manual_seed(0)
    fx = ClassifierFeatures(SmallConvNet(in_chans=1, num_classes=10, widths=(8, 16)),
                            InputTransform(channels=1, size=(28, 28), mean=(0.5,), std=(0.5,)), "test_net:00000000")
    assert isinstance(fx, FeatureExtractor)
    from nestvit.generate.models import build_generator

    G = build_generator("nest_28", embed_dims=(8, 8, 4), depths=(1, 1, 1), num_heads=2, latent_dim=8)
    ref = fx.features(torch.rand(64, 1, 28, 28) * 2 - 1)
    res = evaluate_generator(G, fx, ref, n=40, kid_subset=20, kid_subsets=2)
    assert res["feature_net"] == "test_net:00000000" and res["n"] == 40
    assert math.isfinite(res["fid"]) and res["is"] >= 1.0 - 1e-9


def test_feature_net_errors_explain(tmp_path):
    with pytest.raises(FeatureNetError, match="pt_inception-2015-12-05"):  # the missing file is named
        get_feature_extractor("inception:/nonexistent.pth")
    with pytest.raises(FeatureNetError, match="nestvit train fid_features"):  # the fix is named
        get_feature_extractor(str(tmp_path / "missing.safetensors"))
