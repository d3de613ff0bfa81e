"""Alignment metrics against independent references (plain numpy, scipy, scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import pdist, squareform
from scipy.stats import pearsonr, spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict

from vlray.metrics import (
    METRICS,
    GridStats,
    MetricInputError,
    grid,
    grid_stats,
    metric_options,
    score,
    score_stats,
)
from vlray.metrics.engine import setup

N = 64


def related(n=N, widths=(16, 24, 32), noise=0.5, seed=0, latent=8):
    """Layers sharing a latent factor: scores well above chance, below 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, latent))
    return [z @ rng.normal(size=(latent, d)) + noise * rng.normal(size=(n, d)) for d in widths]


@pytest.fixture(scope="module")
def layers():
    both = related(widths=(16, 24, 32, 20, 12))
    return both[:3], both[3:]


def rotation(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ---------------------------------------------------------------------------------------------
# Brute-force references, written plainly


def unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_mutual_knn(x, y, k=10):
    def neighbours(a):
        s = unit_rows(a) @ unit_rows(a).T
        out = []
        for i in range(len(a)):
            row = s[i].copy()
            row[i] = -np.inf
            out.append(set(np.argsort(-row)[:k]))
        return out

    nx, ny = neighbours(x), neighbours(y)
    return np.mean([len(nx[i] & ny[i]) / k for i in range(len(x))])


def hsic_biased(k, g):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ g @ h) / (n - 1) ** 2


def hsic_unbiased(k, g):
    """Song et al. (2012), eq. 5."""
    n = len(k)
    k, g = k.copy(), g.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(g, 0)
    return (
        np.sum(k * g.T) + k.sum() * g.sum() / ((n - 1) * (n - 2)) - 2 * np.sum(k @ g) / (n - 2)
    ) / (n * (n - 3))


def ref_cka(x, y):
    k, g = x @ x.T, y @ y.T
    return hsic_biased(k, g) / np.sqrt(hsic_biased(k, k) * hsic_biased(g, g))


def ref_unbiased_cka(x, y):
    k, g = x @ x.T, y @ y.T
    return hsic_unbiased(k, g) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(g, g))


def ref_cka_rbf(x, y, bandwidth=1.0):
    def gram(a):
        d = pdist(a)
        sigma = bandwidth * np.median(d)
        return np.exp(-(squareform(d) ** 2) / (2 * sigma**2))

    k, g = gram(x), gram(y)
    return hsic_biased(k, g) / np.sqrt(hsic_biased(k, k) * hsic_biased(g, g))


def ref_rsa(x, y):
    return spearmanr(pdist(x, "cosine"), pdist(y, "cosine")).statistic


def knn_mask(kernel, k):
    mask = np.zeros_like(kernel)
    for i in range(len(kernel)):
        row = kernel[i].copy()
        row[i] = -np.inf
        mask[i, np.argsort(-row)[:k]] = 1
    return mask


def ref_cknna(x, y, k=10):
    """Huh et al. (2024) ``cknna`` on l2-normalised features, without the 1e-6 guard."""
    kx, ky = unit_rows(x) @ unit_rows(x).T, unit_rows(y) @ unit_rows(y).T
    mx, my = knn_mask(kx, k), knn_mask(ky, k)
    m = mx * my
    return hsic_unbiased(m * kx, m * ky) / np.sqrt(
        hsic_unbiased(mx * kx, mx * kx) * hsic_unbiased(my * ky, my * ky)
    )


def reduce_svd(a, keep):
    a = a - a.mean(0)
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    r = np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1
    return a @ vt[:r].T


def inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w**-0.5) @ v.T


def cca(a, b):
    """Canonical weights and correlations by covariance whitening."""
    wa, wb = inv_sqrt(a.T @ a), inv_sqrt(b.T @ b)
    u, rho, vt = np.linalg.svd(wa @ a.T @ b @ wb, full_matrices=False)
    return wa @ u, wb @ vt.T, rho


def ref_svcca(x, y, keep=0.99):
    return cca(reduce_svd(x, keep), reduce_svd(y, keep))[2].mean()


def ref_pwcca(x, y, keep=0.99):
    """Morcos et al. (2018): alpha_i = sum_j |<h_i, z_j>| on the side with fewer directions."""
    a, b = reduce_svd(x, keep), reduce_svd(y, keep)
    wa, wb, rho = cca(a, b)
    acts, variates = (x, a @ wa) if a.shape[1] <= b.shape[1] else (y, b @ wb)
    alpha = np.abs(variates.T @ (acts - acts.mean(0))).sum(axis=1)
    return np.sum(alpha * rho) / alpha.sum()


def ref_linear_predictivity(x, y, alphas, folds=5, seed=0):
    cv = KFold(folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(RidgeCV(alphas=alphas), x, y, cv=cv)
    return np.mean([pearsonr(y[:, j], pred[:, j]).statistic for j in range(y.shape[1])])


def ref_procrustes(x, y, k=1, retrieval="nn", csls_k=10, folds=5, seed=0):
    def prep(a):
        return unit_rows(a - a.mean(0))

    x, y = prep(x), prep(y)
    splits = list(KFold(folds, shuffle=True, random_state=seed).split(x))
    # Fewer axes than the smallest training fold has rows (the map is determined there).
    r = min(x.shape[1], y.shape[1], min(len(train) for train, _ in splits) - 1)
    zx, zy = PCA(r).fit_transform(x), PCA(r).fit_transform(y)
    hits = 0
    for train, test in splits:
        rot, _ = orthogonal_procrustes(zx[train], zy[train])
        s = unit_rows(zx[test] @ rot) @ unit_rows(zy[test]).T
        if retrieval == "csls":
            rq = np.sort(s, axis=1)[:, -csls_k:].mean(axis=1)
            rc = np.sort(s, axis=0)[-csls_k:, :].mean(axis=0)
            s = 2 * s - rq[:, None] - rc[None, :]
        for i in range(len(test)):
            hits += np.sum(s[i] > s[i, i]) < k
    return hits / len(x)


# ---------------------------------------------------------------------------------------------
# Against the references


@pytest.mark.parametrize(
    "metric, ref",
    [
        ("mutual_knn", ref_mutual_knn),
        ("cka", ref_cka),
        ("unbiased_cka", ref_unbiased_cka),
        ("cka_rbf", ref_cka_rbf),
        ("rsa", ref_rsa),
        ("cknna", ref_cknna),
        ("svcca", ref_svcca),
        ("pwcca", ref_pwcca),
        ("procrustes_retrieval", ref_procrustes),
    ],
)
def test_matches_reference(layers, metric, ref):
    xs, ys = layers
    for x, y in [(xs[0], ys[0]), (xs[2], ys[1]), (xs[1], xs[1] + related(widths=(24,), seed=5)[0])]:
        assert score(x, y, metric) == pytest.approx(ref(x, y), abs=1e-9)


@pytest.mark.parametrize("method", ["gram", "features"])
def test_cka_methods_match_reference(layers, method):
    xs, ys = layers
    g = grid(xs, ys, "cka", method=method)
    want = [[ref_cka(x - x.mean(0), y - y.mean(0)) for y in ys] for x in xs]
    np.testing.assert_allclose(g, want, atol=1e-10)


def test_options_match_reference(layers):
    xs, ys = layers
    x, y = xs[0], ys[0]
    assert score(x, y, "mutual_knn", k=5) == pytest.approx(ref_mutual_knn(x, y, k=5))
    assert score(x, y, "cknna", k=4) == pytest.approx(ref_cknna(x, y, k=4))
    assert score(x, y, "cka_rbf", bandwidth=0.5) == pytest.approx(ref_cka_rbf(x, y, 0.5))
    assert score(x, y, "svcca", keep_variance=0.8) == pytest.approx(ref_svcca(x, y, 0.8))
    assert score(x, y, "pwcca", keep_variance=0.8) == pytest.approx(ref_pwcca(x, y, 0.8))
    for kw in [{"k": 3}, {"retrieval": "csls", "csls_k": 5}, {"fold_seed": 3, "folds": 4}]:
        want = ref_procrustes(x, y, **{"seed" if a == "fold_seed" else a: v for a, v in kw.items()})
        assert score(x, y, "procrustes_retrieval", **kw) == pytest.approx(want)
    # y_to_x: Y queries retrieve X rows.
    assert score(x, y, "procrustes_retrieval", direction="y_to_x") == pytest.approx(
        ref_procrustes(y, x)
    )


def test_procrustes_retrieval_with_more_dimensions_than_items():
    # 30 items, 64 dimensions: the training folds (24 rows) cannot determine a 30-axis
    # rotation, so the width is capped. The score then matches the reference and, like the
    # map, does not change when either side is rotated (rounding noise no longer decides).
    # (Uncapped, this case scored P@1 0.20, 0.50 or 0.37 as one side was rotated.)
    x, y = related(n=30, widths=(64, 48), noise=3.0, seed=4)
    assert score(x, y, "procrustes_retrieval") == pytest.approx(ref_procrustes(x, y))
    for k in (1, 3):
        base = score(x, y, "procrustes_retrieval", k=k)
        assert score(x @ rotation(64, 1), y, "procrustes_retrieval", k=k) == base
        assert score(x, y @ rotation(48, 2), "procrustes_retrieval", k=k) == base
    # Bootstrap resamples repeat items: the cap counts distinct items, so intervals too
    # stay put under a rotation.
    st = score_stats(x, y, "procrustes_retrieval", n_bootstrap=8, seed=1)
    turned = score_stats(x @ rotation(64, 1), y, "procrustes_retrieval", n_bootstrap=8, seed=1)
    assert (st.ci_low, st.ci_high) == (turned.ci_low, turned.ci_high)


def test_linear_predictivity_matches_sklearn(layers):
    xs, ys = layers
    alphas = (0.01, 1.0, 100.0)
    wide = related(widths=(80,), seed=2)[0]  # wider than the training folds: the gram case
    for x, y in [(xs[0], ys[0]), (wide, ys[1])]:
        got = score(x, y, "linear_predictivity", alphas=alphas)
        assert got == pytest.approx(ref_linear_predictivity(x, y, alphas), abs=1e-8)
        got = score(x, y, "linear_predictivity", alphas=alphas, direction="y_to_x", fold_seed=7)
        assert got == pytest.approx(ref_linear_predictivity(y, x, alphas, seed=7), abs=1e-8)
    # The default log grid: the alpha is picked per target layer in the grid, as in a loop.
    got = grid(xs, ys, "linear_predictivity")
    want = [
        [ref_linear_predictivity(x, y, metric_options("linear_predictivity")["alphas"]) for y in ys]
        for x in xs
    ]
    np.testing.assert_allclose(got, want, atol=1e-8)


def test_clamp_quantile_clamps_each_feature(layers):
    xs, ys = layers
    rng = np.random.default_rng(1)
    x, y = [a * np.exp(rng.normal(size=a.shape)) for a in (xs[0], ys[0])]  # heavy tails

    def clamp(a):
        return np.clip(a, np.quantile(a, 0.05, axis=0), np.quantile(a, 0.95, axis=0))

    for metric, ref in [("cka", ref_cka), ("rsa", ref_rsa), ("mutual_knn", ref_mutual_knn)]:
        assert score(x, y, metric, clamp_quantile=0.95) == pytest.approx(ref(clamp(x), clamp(y)))
    assert score(x, y, "cka", clamp_quantile=0.95) != pytest.approx(score(x, y, "cka"))
    assert score(x, y, "cka", clamp_quantile=1.0) == pytest.approx(score(x, y, "cka"))


def test_center_and_l2_preprocessing(layers):
    xs, ys = layers
    x, y = xs[0] + 3.0, ys[0] - 1.0

    def centred(a):
        return a - a.mean(0)

    # Preprocessing applies to both sides: clamp, then centre, then scale rows.
    want = ref_mutual_knn(centred(x), centred(y))
    assert score(x, y, "mutual_knn", center=True) == pytest.approx(want)
    want = ref_cka(unit_rows(centred(x)), unit_rows(centred(y)))
    assert score(x, y, "cka", l2=True) == pytest.approx(want)
    want = ref_cka(unit_rows(x), unit_rows(y))
    assert score(x, y, "cka", l2=True, center=False) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Known properties


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka", "cka_rbf"])
def test_cka_invariant_to_rotation_and_scaling(layers, metric):
    xs, ys = layers
    x, y = xs[1], ys[0]
    base = score(x, y, metric)
    assert score(3.7 * x @ rotation(x.shape[1]), y, metric) == pytest.approx(base, abs=1e-10)
    assert score(x, 0.2 * y @ rotation(y.shape[1], 1), metric) == pytest.approx(base, abs=1e-10)


def test_self_similarity_is_one(layers):
    x = layers[0][2]
    for metric in [
        "mutual_knn",
        "cka",
        "unbiased_cka",
        "cka_rbf",
        "cknna",
        "rsa",
        "svcca",
        "pwcca",
    ]:
        assert score(x, x, metric) == pytest.approx(1.0, abs=1e-9), metric


def test_rsa_of_monotone_transform_of_distances_is_one():
    # Points on a circle arc: doubling every angle maps each cosine distance u to 2u(2 - u),
    # increasing on [0, 1], so the dissimilarity ranks are unchanged.
    theta = np.random.default_rng(0).uniform(0, np.pi / 4, size=N)
    x = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    y = np.stack([np.cos(2 * theta), np.sin(2 * theta)], axis=1)
    y = np.concatenate([y, np.zeros((N, 3))], axis=1) @ rotation(5)
    assert score(x, y, "rsa") == pytest.approx(1.0, abs=1e-12)
    assert ref_rsa(x, y) == pytest.approx(1.0)
    assert not np.allclose(pdist(x, "cosine"), pdist(y, "cosine"), rtol=0.1)  # not equal


def test_procrustes_recovers_planted_rotation():
    x = related(n=200, widths=(32,), noise=1.0)[0]
    y = x @ rotation(32, 3)
    assert score(x, y, "procrustes_retrieval") == 1.0
    assert score(x, y, "procrustes_retrieval", retrieval="csls") == 1.0
    noisy = y + 1.5 * np.random.default_rng(4).normal(size=y.shape) * x.std()
    chance = 5 / 200  # 1 in a test fold of 40
    p1 = score(x, noisy, "procrustes_retrieval")
    assert 10 * chance < p1 < 1
    assert score(x, noisy, "procrustes_retrieval", k=10) > p1
    st = score_stats(x, noisy, "procrustes_retrieval", n_permutations=19)
    assert st.null_mean[0, 0] < 3 * chance and st.p_value[0, 0] == 1 / 20


@pytest.mark.parametrize("metric", ["mutual_knn", "cka", "rsa", "cknna", "procrustes_retrieval"])
def test_independent_data_scores_near_null(metric):
    x, y = related(n=96, widths=(16,), seed=1)[0], related(n=96, widths=(16,), seed=2)[0]
    st = score_stats(x, y, metric, n_permutations=99, seed=0)
    assert st.p_value[0, 0] > 0.05
    spread = {"mutual_knn": 0.05, "cknna": 0.2, "procrustes_retrieval": 0.05}.get(metric, 0.1)
    assert abs(st.value[0, 0] - st.null_mean[0, 0]) < spread


# ---------------------------------------------------------------------------------------------
# Grid = loop, permutation = recomputation


@pytest.mark.parametrize("metric", METRICS)
def test_grid_matches_loop_over_score(layers, metric):
    xs, ys = layers
    g = grid(xs, ys, metric, labels_x=["a0", "a1", "a2"], labels_y=["b0", "b1"])
    assert g.shape == (3, 2)
    loop = [[score(x, y, metric) for y in ys] for x in xs]
    np.testing.assert_allclose(g, loop, atol=1e-5, rtol=0)


def test_blocked_large_n_paths_agree(layers, monkeypatch):
    """Row-blocked neighbour search, blocked overlap counting and streamed feature-space CKA
    (the large-n paths) give the same grid as the one-block computation."""
    from vlray.metrics import kernels, knn

    xs, ys = layers
    want = {m: grid(xs, ys, m) for m in ["mutual_knn", "cknna"]}
    want["cka"] = grid(xs, ys, "cka", method="gram")
    boot = setup(xs, ys, "mutual_knn", None, None, "cpu", None, {})
    rows = torch.from_numpy(np.random.default_rng(0).integers(0, N, size=N))
    want_boot = boot.evaluate(*boot.sides(boot.context(rows)), boot.context(rows))
    monkeypatch.setattr(knn, "SIM_BLOCK_BYTES", 5 * N * 8)  # 5 rows per similarity block
    monkeypatch.setattr(knn, "OVERLAP_BLOCK_KEYS", 7 * 5 * 10)  # 7 query rows per count
    monkeypatch.setattr(kernels, "FEATURE_BLOCK_BYTES", 9 * 104 * 8)  # 9 rows per block
    for metric in ["mutual_knn", "cknna"]:
        np.testing.assert_allclose(grid(xs, ys, metric), want[metric], atol=1e-12)
    np.testing.assert_allclose(grid(xs, ys, "cka", method="features"), want["cka"], atol=1e-12)
    got = boot.evaluate(*boot.sides(boot.context(rows)), boot.context(rows))
    np.testing.assert_allclose(got, want_boot, atol=1e-12)


def test_grid_float32_and_torch_inputs(layers):
    xs, ys = layers
    for metric in ["mutual_knn", "cka", "unbiased_cka", "cka_rbf", "rsa", "cknna"]:
        want = grid(xs, ys, metric)
        got = grid([torch.tensor(x, dtype=torch.float32) for x in xs], ys, metric, dtype="float32")
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("metric", [*METRICS, "cka_features"])
def test_permuted_side_equals_recomputation(layers, metric):
    """The permutation null permutes per-layer precomputation instead of recomputing it."""
    xs, ys = layers
    kw = {}
    if metric == "cka_features":
        metric, kw = "cka", {"method": "features"}
    perm = np.random.default_rng(3).permutation(N)
    problem = setup(xs, ys, metric, None, None, "cpu", None, kw)
    ctx = problem.context()
    sx, sy = problem.sides(ctx)
    got = problem.evaluate(sx, problem.metric.permute(sy, torch.from_numpy(perm)), ctx)
    np.testing.assert_allclose(got, grid(xs, [y[perm] for y in ys], metric, **kw), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Bootstrap handling of repeated rows


def resampled(problem, rows):
    ctx = problem.context(torch.from_numpy(rows))
    return problem.evaluate(*problem.sides(ctx), ctx)[0, 0]


def row_neighbours(a, rows, k):
    """Row-space kNN of a resample: copies of the item itself excluded, copies of a neighbour
    taken in row order (a stable sort), so that both spaces pick the same copies."""
    s = unit_rows(a) @ unit_rows(a).T
    out = []
    for r in range(len(rows)):
        sims = s[rows[r], rows]
        order = np.argsort(-sims, kind="stable")
        order = order[rows[order] != rows[r]]
        out.append(order[:k])
    return out


def test_bootstrap_mutual_knn_is_row_space_knn_with_copies_as_self(layers):
    xs, ys = layers
    x, y = xs[0], ys[0]
    rows = np.random.default_rng(0).integers(0, N, size=N)
    nx, ny = row_neighbours(x, rows, 10), row_neighbours(y, rows, 10)
    want = np.mean([len(set(nx[r]) & set(ny[r])) / 10 for r in range(N)])
    assert resampled(setup([x], [y], "mutual_knn", None, None, "cpu", None, {}), rows) == (
        pytest.approx(want)
    )


def test_bootstrap_cknna_is_masked_hsic_of_resampled_rows(layers):
    xs, ys = layers
    x, y = xs[1], ys[1]
    rows = np.random.default_rng(1).integers(0, N, size=N)
    k = 10

    def mask(a):
        m = np.zeros((N, N))
        for r, nb in enumerate(row_neighbours(a, rows, k)):
            m[r, nb] = 1
        return m

    kx, ky = [unit_rows(a[rows]) @ unit_rows(a[rows]).T for a in (x, y)]
    mx, my = mask(x), mask(y)
    want = hsic_unbiased(mx * my * kx, mx * my * ky) / np.sqrt(
        hsic_unbiased(mx * kx, mx * kx) * hsic_unbiased(my * ky, my * ky)
    )
    assert resampled(setup([x], [y], "cknna", None, None, "cpu", None, {}), rows) == (
        pytest.approx(want)
    )


def test_bootstrap_rsa_leaves_out_pairs_of_copies(layers):
    xs, ys = layers
    x, y = xs[0], ys[0]
    rows = np.random.default_rng(2).integers(0, N, size=N)
    i, j = np.triu_indices(N, 1)
    keep = rows[i] != rows[j]
    dx, dy = squareform(pdist(x[rows], "cosine"))[i, j], squareform(pdist(y[rows], "cosine"))[i, j]
    want = spearmanr(dx[keep], dy[keep]).statistic
    assert resampled(setup([x], [y], "rsa", None, None, "cpu", None, {}), rows) == (
        pytest.approx(want)
    )


def _cka_without_copy_pairs(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    """Plain CKA on a resample, as the cosine of centred Gram matrices over every pair of
    distinct items and the diagonal (a pair of two copies of one item left out)."""

    def gram(a):
        a = a - a.mean(0)
        return a @ a.T

    kx, ky = gram(x[rows]), gram(y[rows])
    keep = (rows[:, None] != rows[None, :]) | np.eye(len(rows), dtype=bool)
    kx, ky = kx * keep, ky * keep
    return float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))


def test_bootstrap_cka_leaves_out_pairs_of_copies(layers):
    xs, ys = layers
    rows = np.random.default_rng(3).integers(0, N, size=N)
    problem = setup([xs[0]], [ys[0]], "cka", None, None, "cpu", None, {"method": "gram"})
    assert resampled(problem, rows) == pytest.approx(_cka_without_copy_pairs(xs[0], ys[0], rows))
    # The feature path (chosen for large n) cannot leave pairs out: it scores the resample
    # with its copies as they are.
    problem = setup([xs[0]], [ys[0]], "cka", None, None, "cpu", None, {"method": "features"})
    assert resampled(problem, rows) == pytest.approx(ref_cka(xs[0][rows], ys[0][rows]))


def test_bootstrap_interval_of_cka_holds_its_estimate():
    """Copies inflate biased HSIC: at a few hundred items an interval built from them sat
    wholly above its own point estimate. With pairs of copies left out it holds it."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(196, 8))
    xs = [z @ rng.normal(size=(8, 64)) + rng.normal(size=(196, 64)) for _ in range(2)]
    ys = [z @ rng.normal(size=(8, 32)) + 2 * rng.normal(size=(196, 32))]
    for metric in ("cka", "unbiased_cka", "cka_rbf"):
        s = grid_stats(xs, ys, metric, n_bootstrap=60, seed=1)
        assert np.all(s.ci_low <= s.value) and np.all(s.value <= s.ci_high), metric


def test_bootstrap_folds_keep_copies_together(layers):
    xs, ys = layers
    rows = np.random.default_rng(4).integers(0, N, size=N)
    problem = setup(
        [xs[0]], [xs[0] @ rotation(16)], "procrustes_retrieval", None, None, "cpu", None, {}
    )
    # With copies split across folds a noise-free rotation is still found, but a copy of the
    # query in the candidates would tie with the right row and, counted, break P@1 == 1.
    assert resampled(problem, rows) == 1.0
    problem = setup([xs[0]], [ys[0]], "linear_predictivity", None, None, "cpu", None, {})
    assert 0 < resampled(problem, rows) < 1


# ---------------------------------------------------------------------------------------------
# Statistics


def test_grid_stats_deterministic_and_sensible(layers):
    xs, ys = layers
    for metric in ["mutual_knn", "cka", "rsa", "cknna"]:
        kw = {"n_bootstrap": 30, "n_permutations": 49, "seed": 7}
        a = grid_stats(xs, ys, metric, **kw)
        b = grid_stats(xs, ys, metric, **kw)
        assert isinstance(a, GridStats) and a.n == N
        for field in ["value", "ci_low", "ci_high", "null_mean", "null_sd", "p_value"]:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert getattr(a, field).shape == (3, 2)
        np.testing.assert_allclose(a.value, grid(xs, ys, metric))
        assert np.all(a.ci_low <= a.value) and np.all(a.value <= a.ci_high), metric
        assert np.all(a.ci_low < a.ci_high)
        assert np.all(a.p_value == 1 / 50), metric  # strongly related: no null reaches it
        assert np.all(a.null_mean < a.value)
        c = grid_stats(xs, ys, metric, **{**kw, "seed": 8})
        assert not np.array_equal(a.ci_low, c.ci_low)


def test_grid_stats_every_metric(layers):
    xs, ys = layers
    for metric in METRICS:
        st = grid_stats(xs[:1], ys[:1], metric, n_bootstrap=3, n_permutations=3, seed=1)
        for field in ["value", "ci_low", "ci_high", "null_mean", "null_sd", "p_value"]:
            assert np.isfinite(getattr(st, field)).all(), (metric, field)


def test_grid_stats_without_replicates_is_nan(layers):
    xs, ys = layers
    st = grid_stats(xs, ys, "cka")
    np.testing.assert_allclose(st.value, grid(xs, ys, "cka"))
    for field in ["ci_low", "ci_high", "null_mean", "null_sd", "p_value"]:
        assert np.isnan(getattr(st, field)).all()
    # One permutation: a null mean, but no spread (ddof=1 needs two).
    st = grid_stats(xs, ys, "cka", n_permutations=1)
    assert np.isfinite(st.null_mean).all() and np.isnan(st.null_sd).all()
    st = score_stats(xs[0], ys[0], "cka", n_bootstrap=5, confidence=0.5)
    assert st.value.shape == (1, 1) and np.isfinite(st.ci_low).all()


def test_null_sd_and_calibrated_scores_are_those_of_the_null_replicates(layers):
    # The null computed by hand (the same permutations: same seed), against GridStats and the
    # rows grid_rows makes of it: calibrated = value - mean(null), z = that / sd(null, ddof=1).
    from vlray.metrics.stats import null_scores
    from vlray.results import Condition, alignment_table, grid_rows

    xs, ys = layers
    for metric in ["cka", "mutual_knn"]:
        st = grid_stats(xs, ys, metric, n_bootstrap=5, n_permutations=20, seed=3)
        problem = setup(xs, ys, metric, None, None, None, None, {})
        sx, sy = problem.sides(problem.context())
        nulls = null_scores(problem, sx, sy, range(20), 3)
        assert nulls.shape == (20, 3, 2)
        np.testing.assert_allclose(st.null_mean, nulls.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(st.null_sd, nulls.std(axis=0, ddof=1), rtol=1e-12)
        assert np.all(st.null_sd > 0)
        where = dict(
            study="layerwise", dataset="d", vision_model="v", language_model="t", run_id="r"
        )
        rows = grid_rows(st, metric=metric, condition=Condition(), **where)
        assert len(rows) == 6
        for r in rows:
            i, j = r["vision_layer"], r["language_layer"]
            null = nulls[:, i, j]
            assert r["null_sd"] == pytest.approx(np.std(null, ddof=1), rel=1e-12)
            assert r["calibrated"] == pytest.approx(st.value[i, j] - null.mean(), rel=1e-12)
            z = (st.value[i, j] - null.mean()) / np.std(null, ddof=1)
            assert r["z_score"] == pytest.approx(z, rel=1e-12)
            assert r["z_score"] > 3  # strongly related layers stand far above the null
        table = alignment_table(rows)
        names = table.column_names
        assert names[names.index("null_mean") + 1 :][:3] == ["null_sd", "calibrated", "z_score"]


def test_calibrated_and_z_score_are_null_without_a_null():
    from vlray.results import Condition, score_row

    def row(**stats):
        return score_row(
            study="s",
            dataset="d",
            vision_model="v",
            language_model="t",
            vision_layer=0,
            language_layer=0,
            metric="cka",
            condition=Condition(),
            value=0.5,
            n=10,
            run_id="r",
            **stats,
        )

    def got(r):
        return r["null_sd"], r["calibrated"], r["z_score"]

    assert got(row()) == (None, None, None)
    assert got(row(null_mean=0.25)) == (None, 0.25, None)
    assert got(row(null_mean=0.25, null_sd=0.0)) == (0.0, 0.25, None)
    assert got(row(null_mean=0.25, null_sd=float("nan"))) == (None, 0.25, None)
    assert got(row(null_mean=float("inf"), null_sd=0.1)) == (0.1, None, None)
    assert got(row(null_mean=0.25, null_sd=0.125)) == (0.125, 0.25, 2.0)
    assert got(row(null_sd=0.125)) == (0.125, None, None)  # a spread without its mean


def test_bootstrap_interval_is_independent_of_permutations(layers):
    xs, ys = layers
    a = grid_stats(xs, ys, "mutual_knn", n_bootstrap=10, seed=1)
    b = grid_stats(xs, ys, "mutual_knn", n_bootstrap=10, n_permutations=5, seed=1)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)


# ---------------------------------------------------------------------------------------------
# Bad input


def raises(match, *args, **kw):
    with pytest.raises(MetricInputError, match=match):
        grid(*args, **kw)


def test_bad_values_name_the_layer(layers):
    xs, ys = layers
    bad = xs[1].copy()
    bad[0, :3] = np.nan
    labels = {
        "labels_x": ["vit layer 0", "vit layer 1", "vit layer 2"],
        "labels_y": ["minilm_l6 layer 3", "minilm_l6 layer 4"],
    }
    raises("vit layer 1: 3 NaN values", [xs[0], bad, xs[2]], ys, "cka", **labels)
    bad[0, :3] = np.inf
    bad[1, 0] = -np.inf
    raises("vit layer 1: 4 infinite values", [xs[0], bad, xs[2]], ys, "mutual_knn", **labels)
    raises(
        r"minilm_l6 layer 4: 63 rows, but vit layer 0 has 64",
        xs,
        [ys[0], ys[1][:-1]],
        "rsa",
        **labels,
    )
    raises(
        r"minilm_l6 layer 3: expected a 2-D .* shape \(64,\)",
        xs,
        [ys[0][:, 0], ys[1]],
        "cka",
        **labels,
    )
    const = np.ones_like(ys[1])
    for metric in METRICS:
        raises("minilm_l6 layer 4: all 64 rows are identical", xs, [ys[0], const], metric, **labels)
    x = xs[0].copy()
    x[3, 1] = x[7, 2] = np.nan
    with pytest.raises(MetricInputError, match="efficientnet_lite0 layer 3: 2 NaN values"):
        score(x, ys[0], "cka", label_x="efficientnet_lite0 layer 3")
    with pytest.raises(MetricInputError, match="Y: expected numeric values"):
        score(xs[0], np.full((N, 2), "a"), "cka")


def test_too_few_rows_names_the_layer():
    x = related(n=10, widths=(6, 5))
    with pytest.raises(
        MetricInputError, match=r"vision layer 0: 10 rows; mutual_knn needs at least 11"
    ):
        grid([x[0]], [x[1]], "mutual_knn", labels_x=["vision layer 0"])
    with pytest.raises(MetricInputError, match="X: 10 rows; cknna needs at least 11"):
        score(x[0], x[1], "cknna")
    with pytest.raises(MetricInputError, match="needs at least 10"):
        score(x[0][:8], x[1][:8], "linear_predictivity")
    with pytest.raises(MetricInputError, match="needs at least 4"):
        score(x[0][:3], x[1][:3], "unbiased_cka")
    with pytest.raises(MetricInputError, match="needs at least 55"):
        score(x[0], x[1], "procrustes_retrieval", retrieval="csls")
    assert np.isfinite(score(x[0], x[1], "mutual_knn", k=3))


def test_bad_metric_and_options(layers):
    xs, ys = layers
    raises("unknown metric 'ckaa'", xs, ys, "ckaa")
    raises("cka: unknown option 'k'", xs, ys, "cka", k=10)
    raises("mutual_knn: k must be an integer >= 1", xs, ys, "mutual_knn", k=0)
    raises("clamp_quantile must be None or a number in", xs, ys, "rsa", clamp_quantile=0.01)
    raises("center must be True or False", xs, ys, "rsa", center="yes")
    raises("retrieval must be one of nn, csls", xs, ys, "procrustes_retrieval", retrieval="knn")
    raises("alphas must be a non-empty list", xs, ys, "linear_predictivity", alphas=[0.0, 1.0])
    raises("labels_x: 1 labels for 3 layers", xs, ys, "cka", labels_x=["one"])
    raises("Xs: no layers given", [], ys, "cka")
    raises("dtype must be", xs, ys, "cka", dtype="float16")
    with pytest.raises(MetricInputError, match="n_bootstrap must be a non-negative integer"):
        grid_stats(xs, ys, "cka", n_bootstrap=-1)
    with pytest.raises(MetricInputError, match="confidence must be in"):
        grid_stats(xs, ys, "cka", confidence=95)


def test_zero_norm_rows_and_constant_columns(layers):
    xs, ys = layers
    x = xs[0].copy()
    x[5] = 0.0
    with pytest.raises(MetricInputError, match="img layer: 1 rows have zero norm"):
        score(x, ys[0], "mutual_knn", label_x="img layer")
    with pytest.raises(MetricInputError, match="img layer: 1 rows have zero norm"):
        score(x, ys[0], "rsa", label_x="img layer")
    assert np.isfinite(score(x, ys[0], "cka"))  # no cosine: a zero row is just an item
    # A constant column among others is fine for every metric.
    x = xs[0].copy()
    x[:, 3] = 2.5
    y = ys[0].copy()
    y[:, 0] = -1.0
    for metric in METRICS:
        assert np.isfinite(score(x, y, metric)), metric
    # ... and left out of linear predictivity's mean over target columns.
    alphas = (0.1, 10.0)
    want = np.mean(
        [
            pearsonr(y[:, j], p).statistic
            for j, p in enumerate(
                cross_val_predict(
                    RidgeCV(alphas=alphas), x, y, cv=KFold(5, shuffle=True, random_state=0)
                ).T
            )
            if j != 0
        ]
    )
    assert score(x, y, "linear_predictivity", alphas=alphas) == pytest.approx(want, abs=1e-8)


def test_degenerate_layers_raise(layers):
    xs, ys = layers
    # Rows that differ only by scale: cosine dissimilarities are all 0.
    scaled = np.outer(np.arange(1, N + 1), np.ones(4))
    with pytest.raises(MetricInputError, match="Y: .*rsa is undefined"):
        score(xs[0], scaled, "rsa")
    # More than half the rows identical: the RBF bandwidth is 0.
    mostly = np.zeros((N, 3))
    mostly[:10] = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(MetricInputError, match="Y: the median pairwise distance is 0"):
        score(xs[0], mostly, "cka_rbf")


def test_min_items_against_simulated_bootstrap_resamples():
    """The minimum n with bootstrap resampling: at it, simulated resamples almost never fall
    short of the metric's distinct items; one item fewer, they do more often than allowed."""
    from vlray.metrics import fit_options, min_items
    from vlray.metrics.stats import short_resample_chance

    rng = np.random.default_rng(0)
    for n, need in ((12, 3), (26, 11), (40, 20)):
        draws = 40_000
        distinct = np.array([len(np.unique(rng.integers(0, n, n))) for _ in range(draws)])
        simulated = (distinct < need).mean()
        exact = short_resample_chance(n, need)
        assert abs(simulated - exact) < 4 * np.sqrt(exact * (1 - exact) / draws) + 1e-4
    n, why = min_items("mutual_knn", bootstrap=100, k=10)
    assert 100 * short_resample_chance(n, 11) <= 0.01 < 100 * short_resample_chance(n - 1, 11)
    assert "k=10 neighbours" in why and "11 distinct in every bootstrap resample" in why
    assert min_items("mutual_knn", k=10) == (11, "k=10 neighbours besides the item itself")
    # the largest k that fits 20 items: it fits, k + 1 does not
    k = fit_options("mutual_knn", 20, bootstrap=100)["k"]
    assert min_items("mutual_knn", bootstrap=100, k=k)[0] <= 20
    assert min_items("mutual_knn", bootstrap=100, k=k + 1)[0] > 20
    assert fit_options("cka", 20, bootstrap=100) == {}
    assert fit_options("unbiased_cka", 5, bootstrap=100) is None  # no option helps


def test_concept_retrievals_analytic_null_sd_is_that_of_a_mean_of_bernoulli_hits():
    # Every outcome of 3 independent hits with chances p, weighted: the exact sd of their mean.
    import itertools

    from vlray.studies.concept_retrieval import chance, chance_sd

    p = np.array([chance(50, 1, 10), chance(50, 2, 10), chance(50, 3, 10)])
    outcomes = np.array(list(itertools.product([0, 1], repeat=3)), dtype=float)
    weights = np.prod(np.where(outcomes == 1, p, 1 - p), axis=1)
    means = outcomes.mean(axis=1)
    mean = weights @ means
    assert mean == pytest.approx(p.mean())
    assert chance_sd(p) == pytest.approx(np.sqrt(weights @ (means - mean) ** 2), rel=1e-12)
    assert chance_sd(np.array([1.0, 1.0])) == 0.0  # certain hits: no spread
