"""FID/KID math against independent answers: running statistics, Fréchet distance, KID, files."""

import itertools
import os

import numpy as np
import pytest
import scipy.linalg

from ldm_jax.eval import fid


def _relative_error(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


# ---------------------------------------------------------------- FeatureStatistics


def test_statistics_over_uneven_batches_match_numpy():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((203, 7)) @ rng.standard_normal((7, 7)) + rng.standard_normal(7)
    stats = fid.FeatureStatistics()
    # Batches of 1 and 0 included (np.split gives an empty one between the two 1s).
    for batch in np.split(features, [1, 1, 64, 65, 200]):
        stats.update(batch)
    stats.update(np.zeros((0, 7), np.float32))
    assert stats.num == 203
    # Both sides are float64 (measured 8e-16): 1e-12 leaves room for other summation orders and
    # BLAS kernels and still catches a wrong ddof (0.5%) or a wrong merge weight.
    assert _relative_error(stats.mu, features.mean(axis=0)) < 1e-12
    assert _relative_error(stats.sigma, np.cov(features, rowvar=False)) < 1e-12
    assert stats.mu.dtype == stats.sigma.dtype == np.float64


def test_statistics_survive_a_large_common_offset():
    rng = np.random.default_rng(1)
    centered = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    offset = 1e4
    shifted = centered + offset
    stats = fid.FeatureStatistics()
    for batch in np.array_split(shifted, [1, 500, 1200]):
        stats.update(batch)
    # The covariance does not depend on the offset, so np.cov of the centered data is the answer.
    expected = np.cov(centered, rowvar=False)
    # Adding 1e4 rounds each value by up to 1e4 * 1.1e-16 ~ 1e-12 of the unit spread, a floor no
    # method can beat; measured 1e-13, and 1e-11 is well above that and far below the naive error.
    ours = _relative_error(stats.sigma, expected)
    assert ours < 1e-11
    # The textbook one-pass formula (sum x x^T - n mean mean^T) cancels two ~1e8 * n sums: it loses
    # about 8 of float64's 16 digits (measured 8e-8), so the bound above would catch a switch to it.
    n = len(shifted)
    naive = (shifted.T @ shifted - n * np.outer(shifted.mean(0), shifted.mean(0))) / (n - 1)
    assert _relative_error(naive, expected) > 100 * 1e-11


def test_statistics_errors():
    stats = fid.FeatureStatistics()
    with pytest.raises(ValueError, match="at least 2"):
        stats.sigma
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.sigma
    with pytest.raises(ValueError, match=r"5-d.*4-d"):
        stats.update(np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    assert stats.num == 1  # failed updates change nothing


# ---------------------------------------------------------------- frechet_distance


def _random_psd(rng, d, num_columns):
    a = rng.standard_normal((d, num_columns))
    return a @ a.T / num_columns


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    s1, s2 = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    s2[:3] = 0  # singular too
    # Commuting covariances: (s1 s2)^(1/2) = diag(sqrt(s1 s2)).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    actual = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(actual, float)
    # Well-conditioned float64 eigen/SVD of a 10x10: ~1e-15 expected.
    assert actual == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_full_rank():
    rng = np.random.default_rng(3)
    d = 64
    s1, s2 = _random_psd(rng, d, 2 * d), _random_psd(rng, d, 2 * d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # pytorch-fid's formula.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    # Well conditioned (cond(s1) ~25, cond(s1 s2) ~130), so both float64 routes are good to about
    # cond * d * eps ~ 2e-12 (measured 4e-16); 1e-10 is loose for round-off and catches any formula
    # error, which would be O(1). Symmetry: measured 2e-16.
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-12
    )


def test_frechet_distance_rank_deficient():
    # 50 samples in 128 dims: both covariances have rank 49.
    rng = np.random.default_rng(4)
    a = rng.standard_normal((50, 128))
    b = 1.3 * rng.standard_normal((50, 128)) + 0.2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # An independent answer from the data, with no singular matrix in it: with s = C^T C / (n - 1)
    # (C centred), the nonzero eigenvalues of s1 s2 are the squared singular values of C1 C2^T / (n - 1).
    c1, c2 = a - a.mean(0), b - b.mean(0)
    trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / 49
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    # Measured 2e-15. The square root of a formed, singular product is off by ~sqrt(eps) per null
    # direction: scipy's sqrtm(s1 @ s2) measured 3e-8, eigvalsh(s1^(1/2) s2 s1^(1/2)) 1e-8; the
    # bound 1e-12 tells the two kinds apart.
    assert fid.frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(expected, rel=1e-12)
    # FID(a, a) = 0: before the clip at 0, ours measured -6e-14 (5e-16 of tr(s1) ~126), while
    # scipy's sqrtm gives -3.8e-6 (with an imaginary trace of 2e-7) and eigvalsh -3.9e-6, i.e.
    # 3e-8 of tr(s1). The clip hides negative errors, so this bound only catches positive ones;
    # the test above checks the sign-free error.
    assert fid.frechet_distance(a.mean(0), s1, a.mean(0), s1) <= 1e-12 * np.trace(s1)


def test_frechet_distance_shape_errors():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mu1 must be a vector"):
        fid.frechet_distance(np.zeros((4, 1)), sigma, mu, sigma)
    with pytest.raises(ValueError, match=r"sigma2 must be \[d, d\]"):
        fid.frechet_distance(mu, sigma, mu, np.eye(3))
    with pytest.raises(ValueError, match=r"4-d but .* 3-d"):
        fid.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))


# ---------------------------------------------------------------- kernel_inception_distance


def _mmd2_unbiased_by_loops(x, y):
    """The unbiased MMD^2 estimator as written in Bińkowski et al. 2018, term by term, with
    k(a, b) = (a.b / d + 1)^3, in plain Python."""
    m, d = len(x), len(x[0])

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    within_x = sum(k(x[i], x[j]) for i, j in pairs)
    within_y = sum(k(y[i], y[j]) for i, j in pairs)
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (within_x + within_y) / (m * (m - 1)) - 2 * between / (m * m)


def test_kid_on_whole_sets_equals_the_definition():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 5))
    y = rng.standard_normal((30, 5)) * 1.2 + 0.3
    # One subset of all 30 vectors is a permutation of each set, which the estimator ignores.
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=30)
    expected = _mmd2_unbiased_by_loops(x.tolist(), y.tolist())
    # float64 sums of ~1e3 O(1) terms in different orders: ~1e-13 relative; 1e-10 is loose for that.
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == 0.0


def test_kid_is_unbiased_near_zero_and_positive_for_a_shift():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    shifted = rng.standard_normal((1000, 16)) + 0.5
    kwargs = dict(num_subsets=20, subset_size=200)
    same, _ = fid.kernel_inception_distance(a, b, **kwargs)
    shift, shift_std = fid.kernel_inception_distance(a, shifted, **kwargs)
    # Measured same = -0.006, shift = 1.05 (std 0.09 over subsets); over data seeds 0-4 |same| <=
    # 0.006 and shift >= 0.93. The biased (V-statistic) estimator, which keeps the i == j terms,
    # gives ~ 2 (E k(x, x) - E k(x, y)) / m = 0.07 on these sets, so the bound 0.02 also checks
    # that the diagonal is left out.
    assert abs(same) < 0.02
    assert shift > 5 * shift_std and shift > 50 * abs(same)


def test_kid_is_deterministic_and_checks_its_inputs():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((120, 8)), rng.standard_normal((150, 8))
    kwargs = dict(num_subsets=5, subset_size=100)
    assert fid.kernel_inception_distance(x, y, seed=3, **kwargs) == fid.kernel_inception_distance(
        x, y, seed=3, **kwargs
    )
    assert fid.kernel_inception_distance(x, y, seed=3, **kwargs) != fid.kernel_inception_distance(
        x, y, seed=4, **kwargs
    )
    with pytest.raises(ValueError, match=r"subset_size 130 .* 120 and 150"):
        fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=130)
    with pytest.raises(ValueError, match=r"\(120, 8\) and \(150, 9\)"):
        fid.kernel_inception_distance(x, np.ones((150, 9)), num_subsets=1, subset_size=100)


# ---------------------------------------------------------------- reference files


def _stats(rng, n=40, d=6):
    features = rng.standard_normal((n, d)).astype(np.float32)
    stats = fid.FeatureStatistics()
    stats.update(features)
    return stats, features


def test_save_load_round_trip(tmp_path):
    stats, features = _stats(np.random.default_rng(8))
    path = tmp_path / "ref.npz"
    metadata = {"inception": "pt_inception-2015-12-05", "resize": "bilinear 299"}
    fid.save_statistics(path, stats, features=features, metadata=metadata)
    loaded = fid.load_statistics(path)
    np.testing.assert_array_equal(loaded["mu"], stats.mu)  # float64 stored: bit-exact
    np.testing.assert_array_equal(loaded["sigma"], stats.sigma)
    np.testing.assert_array_equal(loaded["features"], features)
    assert loaded["features"].dtype == np.float32
    assert loaded["num_images"] == 40
    assert loaded["metadata"] == metadata
    assert os.listdir(tmp_path) == ["ref.npz"]  # no temporary file left

    fid.save_statistics(path, stats)  # overwrites; features are optional
    assert fid.load_statistics(path)["features"] is None


def test_load_pytorch_fid_style_npz(tmp_path):
    path = tmp_path / "fid_stats_cifar10_train.npz"
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    np.savez(path, mu=mu, sigma=sigma)
    loaded = fid.load_statistics(path)
    assert loaded["mu"].dtype == loaded["sigma"].dtype == np.float64
    np.testing.assert_array_equal(loaded["mu"], mu)
    assert loaded["num_images"] is None and loaded["features"] is None and loaded["metadata"] == {}


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        fid.load_statistics(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(np.random.default_rng(9).bytes(1000))
    with pytest.raises(ValueError, match="corrupt.npz"):
        fid.load_statistics(corrupt)
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, mu=np.zeros(3), sigma=np.eye(3))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.npz"):
        fid.load_statistics(truncated)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match=r"array.npz.*not an .npz"):
        fid.load_statistics(npy)
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"no_sigma.npz.*missing.*sigma"):
        fid.load_statistics(no_sigma)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"mismatch.npz.*do not match"):
        fid.load_statistics(mismatch)
    bad_features = tmp_path / "bad_features.npz"
    np.savez(bad_features, mu=np.zeros(3), sigma=np.eye(3), features=np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"bad_features.npz.*features"):
        fid.load_statistics(bad_features)


@pytest.mark.parametrize("failing", ["savez", "replace"])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, failing):
    stats, _ = _stats(np.random.default_rng(10))
    path = tmp_path / "ref.npz"
    fid.save_statistics(path, stats, metadata={"version": 1})
    good = path.read_bytes()

    def fail_midway(file, **arrays):  # some bytes of the archive are out before the error
        file.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if failing == "savez":
        monkeypatch.setattr(np, "savez", fail_midway)
    else:
        monkeypatch.setattr(os, "replace", fail)
    other, _ = _stats(np.random.default_rng(11))
    with pytest.raises(OSError, match="disk full"):
        fid.save_statistics(path, other, metadata={"version": 2})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ref.npz"]
    assert fid.load_statistics(path)["metadata"] == {"version": 1}
