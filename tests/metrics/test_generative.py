"""Tests of covidxray.metrics.generative: closed forms, hand-computed values and limiting cases.

Every expected value is derived here (by hand, by explicit loops or from a closed form), never copied
from a previous run of the code under test.
"""

import math

import numpy as np
import pytest
import torch

from covidxray.errors import CovidXrayError
from covidxray.metrics import generative as G


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------- feature_stats

def test_feature_stats_is_mean_and_unbiased_covariance():
    x = _rng(1).normal(size=(50, 4))
    mu, sigma = G.feature_stats(torch.from_numpy(x).float())  # torch input, converted to float64
    xf = torch.from_numpy(x).float().double().numpy()
    centred = xf - xf.sum(axis=0) / 50
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, xf.sum(axis=0) / 50, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12, atol=1e-12)  # N - 1


def test_feature_stats_refuses_one_sample_and_bad_rank():
    with pytest.raises(CovidXrayError, match="at least 2"):
        G.feature_stats(np.ones((1, 3)))
    with pytest.raises(CovidXrayError, match="2-D"):
        G.feature_stats(np.ones(5))


# ------------------------------------------------------------------------------ frechet_distance

def test_identical_feature_sets_give_zero():
    a = _rng(2).normal(size=(400, 10))
    assert abs(G.fid_from_features(a, a)) < 1e-6
    mu, sigma = G.feature_stats(a)
    assert abs(G.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.5, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # diagonal covariances commute: sqrtm(S1 S2) = diag(sqrt(s1 s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # by hand: 2.25 + 0 + 6.25 = 8.5 ; (1+9-6) + (4+1-4) + (0.25+0.25-0.5) = 5 -> 13.5
    assert expected == pytest.approx(13.5)
    assert G.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(13.5, abs=1e-9)


def test_mean_shift_adds_its_squared_norm():
    rng = _rng(3)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    _, s1 = G.feature_stats(a)
    _, s2 = G.feature_stats(b)
    mu = rng.normal(size=6)
    v = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])  # ||v||^2 = 1 + 4 + 0.25 + 9 + 1 = 15.25
    base = G.frechet_distance(mu, s1, mu, s2)
    assert G.frechet_distance(mu + v, s1, mu, s2) - base == pytest.approx(15.25, abs=1e-8)
    # shifting every feature vector by v moves only the mean
    assert G.fid_from_features(a + v, a) == pytest.approx(15.25, abs=1e-6)


def test_symmetric_in_its_arguments():
    rng = _rng(4)
    a, b = rng.normal(size=(200, 5)), rng.gamma(2.0, size=(200, 5))
    assert G.fid_from_features(a, b) == pytest.approx(G.fid_from_features(b, a), rel=1e-8)
    assert G.fid_from_features(a, b) > 0.1


def test_rank_deficient_covariances_give_a_finite_value():
    rng = _rng(5)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.2  # N < D: singular covariances
    d = G.fid_from_features(a, b)
    assert math.isfinite(d) and d >= 0.0


def test_non_finite_square_root_is_retried_with_eps_on_the_diagonal(monkeypatch):
    real_sqrtm, calls = G._sqrtm, []

    def flaky(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(G, "_sqrtm", flaky)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    d = G.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.01)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 0.01 * np.eye(2)) @ (s2 + 0.01 * np.eye(2)))
    # as in pytorch-fid, only the root uses the shifted covariances; the traces are of s1, s2:
    # (1 + 4) + (4 + 1) - 2 * (sqrt(1.01 * 4.01) + sqrt(4.01 * 1.01))
    assert d == pytest.approx(10 - 4 * math.sqrt(1.01 * 4.01), abs=1e-9)


def test_complex_square_root_real_part_or_error(monkeypatch):
    s = np.eye(2)
    monkeypatch.setattr(G, "_sqrtm", lambda m: np.eye(2) + 1e-5j * np.eye(2))
    assert G.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(G, "_sqrtm", lambda m: np.eye(2) + 0.1j * np.eye(2))
    with pytest.raises(CovidXrayError, match="imaginary"):
        G.frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_fid_refuses_mismatched_dimensions():
    with pytest.raises(CovidXrayError, match="same network"):
        G.fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


def test_fid_and_kid_agree_with_torch_fidelity():
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = _rng(6)
    a, b = rng.normal(size=(300, 12)), rng.normal(size=(300, 12)) * 1.3 + 0.2
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ref = fid_statistics_to_metric(fid_features_to_statistics(ta), fid_features_to_statistics(tb), verbose=False)
    assert G.fid_from_features(a, b) == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    # one subset holding every sample: the estimate no longer depends on either library's RNG
    ref_kid = kid_features_to_metric(ta, tb, kid_subsets=1, kid_subset_size=300, verbose=False)
    assert G.kid(a, b, subsets=1, subset_size=300)[0] == pytest.approx(
        ref_kid["kernel_inception_distance_mean"], rel=1e-6)


# ------------------------------------------------------------------------------------------- KID

def test_kid_matches_a_hand_computed_unbiased_mmd():
    x = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [0.5, 0.0]])
    y = np.array([[1.0, 0.0], [-1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])

    def k(u, v):  # (x.y / D + 1)^3 with D = 2
        return (sum(ui * vi for ui, vi in zip(u, v)) / 2 + 1) ** 3

    m = 4
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = (kxx + kyy) / (m * (m - 1)) - 2 * kxy / (m * m)
    mean, std = G.kid(x, torch.from_numpy(y), subsets=1, subset_size=4)
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == 0.0
    # subset_size larger than the sets is capped: still every row, same answer
    assert G.kid(x, y, subsets=3, subset_size=1000) == pytest.approx((expected, 0.0), abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted_means():
    rng = _rng(7)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    same_mean, same_std = G.kid(a, b, subsets=50, subset_size=200)
    # each subset's estimate is unbiased with spread same_std; their average is no further from 0
    assert abs(same_mean) < 3 * same_std
    diff_mean, diff_std = G.kid(a, b + 0.5, subsets=50, subset_size=200)
    assert diff_mean > 5 * diff_std and diff_mean > 10 * same_std


def test_kid_is_reproducible_and_refuses_tiny_subsets():
    rng = _rng(8)
    a, b = rng.normal(size=(100, 4)), rng.normal(size=(100, 4))
    assert G.kid(a, b, subsets=5, subset_size=20, seed=3) == G.kid(a, b, subsets=5, subset_size=20, seed=3)
    assert G.kid(a, b, subsets=5, subset_size=20, seed=3) != G.kid(a, b, subsets=5, subset_size=20, seed=4)
    with pytest.raises(CovidXrayError, match="at least 2"):
        G.kid(a[:1], b)
    with pytest.raises(CovidXrayError, match="at least 2"):
        G.kid(a, b, subset_size=1)


# ------------------------------------------------------------- precision/recall, density/coverage

def test_identical_point_clouds_are_fully_precise_recalled_and_covered(capsys):
    real = _rng(9).normal(size=(200, 5))
    pr = G.precision_recall(real, real.copy(), k=3)
    dc = G.density_coverage(real, real.copy(), k=5)
    assert pr == {"precision": 1.0, "recall": 1.0}
    assert dc["coverage"] == 1.0
    assert all(type(v) is float for v in (*pr.values(), *dc.values()))
    assert capsys.readouterr().out == ""  # prdc's "Num real: ..." line is swallowed


def test_far_away_fake_cloud_scores_zero():
    rng = _rng(10)
    real, fake = rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 100.0
    assert G.precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}
    assert G.density_coverage(real, fake) == {"density": 0.0, "coverage": 0.0}


def test_fake_set_holding_one_of_two_clusters():
    rng = _rng(11)
    cluster_a, cluster_b = rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 50.0
    real, fake = np.concatenate([cluster_a, cluster_b]), cluster_a.copy()
    # every fake point is a real point (distance 0 < its own k-NN radius): precision 1; exactly the
    # real points of cluster A lie in fake balls / have a fake point in their ball: recall = coverage
    # = 100/200. Density: each real ball of A holds itself and its k-1 nearest neighbours (radius =
    # distance to the k-th, strict <), all fake points, B balls hold none -> (100 * k) / (k * 100) = 1.
    pr = G.precision_recall(real, fake, k=3)
    dc = G.density_coverage(real, fake, k=5)
    assert pr["precision"] == 1.0 and pr["recall"] == 0.5
    assert dc["coverage"] == 0.5
    assert dc["density"] == pytest.approx(1.0, abs=1e-12)


def test_prdc_refuses_too_few_points():
    rng = _rng(12)
    real, fake = rng.normal(size=(50, 3)), rng.normal(size=(4, 3))
    with pytest.raises(CovidXrayError, match="at least 5"):  # k=3 -> k + 2 = 5
        G.precision_recall(real, fake, k=3)
    with pytest.raises(CovidXrayError, match="at least 7"):  # k=5 -> 7
        G.density_coverage(fake, real, k=5)
    G.precision_recall(real, rng.normal(size=(5, 3)), k=3)  # k + 2 points is enough


# ------------------------------------------------------------------------------------ MS-SSIM

def _smooth_images(n, size, seed=0, noise=4.0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 60 + 120 * torch.exp(-((xx - 0.5) ** 2 + (yy - 0.4) ** 2) / 0.08) + 40 * xx
    imgs = base.expand(n, 1, size, size) + noise * torch.randn(n, 1, size, size, generator=g)
    return imgs.round().clamp(0, 255).to(torch.uint8)


def _noise_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


def _scales_by_formula(side):
    return max(k for k in range(1, 6) if side > 10 * 2 ** (k - 1))


def test_identical_images_have_ms_ssim_one():
    one = _smooth_images(1, 64)
    out = G.ms_ssim_diversity(one.repeat(6, 1, 1, 1), n_pairs=30)
    assert out["mean"] == pytest.approx(1.0, abs=1e-4)
    assert out["n_pairs"] == 30 and out["scales"] == _scales_by_formula(64) == 3


def test_noise_is_more_diverse_than_similar_smooth_images():
    noise = G.ms_ssim_diversity(_noise_images(20, 64), n_pairs=100)
    smooth = G.ms_ssim_diversity(_smooth_images(20, 64), n_pairs=100)
    assert noise["mean"] < 0.2 < 0.8 < smooth["mean"]


def test_scales_follow_the_image_size():
    assert [G.ms_ssim_scales(s) for s in (32, 40, 41, 80, 81, 160, 161, 512)] == \
        [_scales_by_formula(s) for s in (32, 40, 41, 80, 81, 160, 161, 512)] == [2, 2, 3, 3, 4, 4, 5, 5]
    out = G.ms_ssim_diversity(_smooth_images(3, 128), n_pairs=4)
    assert out["scales"] == _scales_by_formula(128) == 4
    assert 0.0 < out["mean"] <= 1.0


def test_diversity_uses_the_first_weights_renormalised():
    imgs = torch.cat([_smooth_images(1, 64, seed=3), _smooth_images(1, 64, seed=4, noise=30.0)])
    w = [0.0448, 0.2856, 0.3001]  # three scales at 64 px
    w = [x / sum(w) for x in w]
    expected = G._ms_ssim_recursion(imgs[:1].float(), imgs[1:].float(), w).item()
    assert G.ms_ssim_diversity(imgs, n_pairs=3)["mean"] == pytest.approx(expected, rel=1e-6)


def test_pairs_are_always_two_different_images():
    # two different images: every pair is (0, 1) or (1, 0) with the same symmetric score; an i == j
    # pair would score 1 and show up in the spread
    imgs = torch.cat([_smooth_images(1, 64), _noise_images(1, 64)])
    out = G.ms_ssim_diversity(imgs, n_pairs=50, seed=1)
    assert out["mean"] < 0.5 and out["std"] < 1e-5


def test_recursion_matches_pytorch_msssim():
    from pytorch_msssim import ms_ssim, ssim

    a = _smooth_images(3, 176, seed=1).float()
    b = _smooth_images(3, 176, seed=2, noise=20.0).float()
    w = list(G.MS_SSIM_WEIGHTS)
    ref = ms_ssim(a, b, data_range=255, size_average=False, weights=w)
    torch.testing.assert_close(G._ms_ssim_recursion(a, b, w), ref, rtol=1e-5, atol=1e-6)
    # one scale is plain SSIM (ReLU-ed)
    one = ssim(a, b, data_range=255, size_average=False, nonnegative_ssim=True)
    torch.testing.assert_close(G._ms_ssim_recursion(a, b, [1.0]), one, rtol=1e-5, atol=1e-6)


def test_ms_ssim_refuses_small_or_wrong_inputs():
    with pytest.raises(CovidXrayError, match="32 px"):
        G.ms_ssim_diversity(_noise_images(4, 31))
    with pytest.raises(CovidXrayError, match="at least 2"):
        G.ms_ssim_diversity(_noise_images(1, 64))
    with pytest.raises(CovidXrayError, match="uint8"):
        G.ms_ssim_diversity(_noise_images(4, 64).float())


# ------------------------------------------------------------------------------- memorisation

def test_nearest_distances_finds_copied_rows_exactly():
    rng = _rng(13)
    ref = rng.normal(size=(300, 20)) * 5 + 3
    fresh = rng.normal(size=(7, 20)) * 5 + 3
    query = np.concatenate([ref[[5, 17, 123, 299]], fresh])
    dist, idx = G.nearest_distances(query, torch.from_numpy(ref), chunk=3)
    assert dist[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert idx[:4].tolist() == [5, 17, 123, 299]
    brute = np.sqrt(((fresh[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(dist[4:], brute.min(axis=1), rtol=1e-12)
    assert idx[4:].tolist() == brute.argmin(axis=1).tolist()


def test_copy_threshold_and_copies_fraction_by_hand():
    assert G.copy_threshold(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), q=0.25) == pytest.approx(1.0)
    assert G.copy_threshold([4.0, 0.0, 2.0, 1.0, 3.0], q=0.1) == pytest.approx(0.4)  # linear between 0 and 1
    d = np.array([0.0, 0.0, 1.0, 2.0])
    assert G.copies_fraction(d, 1.0) == 0.5    # strictly below
    assert G.copies_fraction(d, 1.5) == 0.75
    assert G.copies_fraction(d, 0.0) == 0.5    # threshold 0: exact duplicates count


def test_training_copies_are_flagged_and_fresh_samples_are_not():
    rng = _rng(14)
    train, test, held = (rng.normal(size=(500, 8)) for _ in range(3))
    thr = G.copy_threshold(G.nearest_distances(test, train)[0], q=0.01)
    assert thr > 0
    copier = train[rng.permutation(500)[:200]]
    assert G.copies_fraction(G.nearest_distances(copier, train)[0], thr) == 1.0
    assert G.copies_fraction(G.nearest_distances(held, train)[0], thr) < 0.05


def test_pixel_embedding_shape_scale_and_brightness_invariance():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 101, (3, 1, 64, 64), dtype=torch.uint8, generator=g)
    brighter = (img.int() * 2 + 30).to(torch.uint8)  # <= 230, no clipping
    e, e2 = G.pixel_embedding(img, size=16), G.pixel_embedding(brighter, size=16)
    assert e.shape == (3, 256) and e.dtype == np.float32
    np.testing.assert_allclose(e, e2, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)  # standardised / sqrt(size^2)
    assert np.abs(e[0] - e[1]).max() > 0.01


def test_pixel_embedding_averages_areas():
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=g)
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each pixel a 2x2 block
    np.testing.assert_allclose(G.pixel_embedding(big, 32), G.pixel_embedding(small, 32), atol=1e-6)
    x = small[0, 0].double().flatten()
    manual = (x - x.mean()) / (x.std(correction=0) + 1e-8) / 32
    np.testing.assert_allclose(G.pixel_embedding(small[:1], 32)[0], manual.numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------- C_T

def test_mann_whitney_statistic_counts_first_sample_wins():
    from scipy.stats import mannwhitneyu

    # pairs with x > y: 3>1, 5>1, 5>3, 5>4 = 4, plus the tie 3 = 3 counted 1/2 -> 4.5
    assert mannwhitneyu([3, 5], [1, 3, 4], alternative="two-sided", method="asymptotic").statistic == 4.5


def _z_by_hand(d_gen, d_test):
    u = sum(1.0 if dg > dt else 0.5 if dg == dt else 0.0 for dg in d_gen for dt in d_test)
    m, n = len(d_gen), len(d_test)
    return (u - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12)


def test_ct_with_one_cell_matches_hand_computed_z():
    rng = _rng(15)
    train, test, gen = rng.normal(size=(200, 3)), rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) * 0.8
    out = G.data_copying_ct(train, test, gen, n_cells=1)
    d_test = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1)).min(1)
    d_gen = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1)).min(1)
    z = _z_by_hand(d_gen, d_test)
    assert out == {"ct": pytest.approx(z, rel=1e-9), "cells": 1, "cells_used": 1, "reason": ""}


def test_ct_weights_cells_by_their_share_of_the_test_set():
    rng = _rng(18)
    far = np.array([100.0, 0.0, 0.0])  # two clusters k-means cannot split any other way
    train = np.concatenate([rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + far])
    test = np.concatenate([rng.normal(size=(30, 3)), rng.normal(size=(10, 3)) + far])
    gen = np.concatenate([rng.normal(size=(20, 3)) * 0.5, rng.normal(size=(25, 3)) * 1.5 + far])

    def nn(q):
        return np.sqrt(((q[:, None] - train[None]) ** 2).sum(-1)).min(1)

    in_a_test, in_a_gen = test[:, 0] < 50, gen[:, 0] < 50
    z_a = _z_by_hand(nn(gen[in_a_gen]), nn(test[in_a_test]))
    z_b = _z_by_hand(nn(gen[~in_a_gen]), nn(test[~in_a_test]))
    out = G.data_copying_ct(train, test, gen, n_cells=2)
    assert out["cells_used"] == 2
    assert out["ct"] == pytest.approx((30 / 40) * z_a + (10 / 40) * z_b, rel=1e-9)
    # a cell below min_per_cell drops out and the weights renormalise over the rest
    only_a = G.data_copying_ct(train, test, gen, n_cells=2, min_per_cell=15)
    assert only_a["cells_used"] == 1 and only_a["ct"] == pytest.approx(z_a, rel=1e-9)


def test_ct_detects_copying_and_accepts_fresh_samples():
    rng = _rng(16)
    train, test = rng.normal(size=(500, 5)), rng.normal(size=(200, 5))
    copies = train[:300] + 1e-6 * rng.normal(size=(300, 5))
    fresh = rng.normal(size=(300, 5))
    copied = G.data_copying_ct(train, test, copies)
    assert copied["cells"] == 10 and copied["cells_used"] >= 5  # default: min(10, 200 // 20)
    assert copied["ct"] < -3
    assert abs(G.data_copying_ct(train, test, fresh)["ct"]) < 3
    assert G.data_copying_ct(train, test, rng.normal(size=(300, 5)) * 2.5)["ct"] > 3  # underfitting


def test_ct_is_none_with_a_reason_when_cells_are_too_small():
    rng = _rng(17)
    train, test, gen = rng.normal(size=(100, 4)), rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    out = G.data_copying_ct(train, test, gen, min_per_cell=50)
    assert out["ct"] is None and out["cells_used"] == 0 and out["cells"] == 1
    assert "50" in out["reason"]


# ---------------------------------------------------------------- the exact fast FID path
@pytest.mark.parametrize("n1,n2,d", [(40, 25, 64), (300, 200, 16), (9, 400, 12)])
def test_exact_fid_equals_the_sqrtm_arithmetic(n1, n2, d):
    """Both branches of trace_sqrt_product (n-space SVD, D-space eigh) against scipy's sqrtm."""
    rng = np.random.default_rng(n1 + n2 + d)
    a = rng.normal(size=(n1, d))
    b = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    ref = G.fid_from_features(a, b, method="sqrtm")
    fast = G.fid_from_features(a, b)
    assert fast == pytest.approx(ref, rel=1e-6, abs=1e-6)
    # Tr sqrtm(S1 S2) itself, from the definition
    from scipy import linalg
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert G.trace_sqrt_product(a, b) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-6)


def test_exact_fid_of_identical_sets_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 128))  # rank-deficient: no eps retry needed
    assert G.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    v = rng.normal(size=128)
    assert G.fid_from_features(a, a + v) == pytest.approx(float(v @ v), rel=1e-9)
    with pytest.raises(CovidXrayError):
        G.fid_from_features(a[:1], a)
