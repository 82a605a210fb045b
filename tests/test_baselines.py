"""Tests of gmmt.evaluation.baselines: ordering on easy data, the oracle's closed form, agreement
with scikit-learn, padding invariance and degenerate sets."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.config.validation import EMConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.baselines import (
    BASELINES,
    EM_REG_COVAR,
    fit_em,
    fit_kmeans,
    initial_em_parameters,
    kmeans_plus_plus_init,
    oracle_posterior_mean,
    run_baseline,
)
from gmmt.evaluation.metrics import adjusted_rand_index, centre_mse_per_set

DTYPE = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bank(num_sets: int, seed: int = 0, **data) -> GMMBatch:
    return validation_bank(DataConfig(**data), seed, num_sets, num_sets, dtype=DTYPE)[0]


def hand_batch(centres: torch.Tensor, weights: torch.Tensor, sigma: float, n: int,
               seed: int = 0) -> GMMBatch:
    """Sets with given centres [b, k, d] and weights [b, k] (0 = padded component)."""
    g = gen(seed)
    b, _, d = centres.shape
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    sig = torch.full((b,), sigma, dtype=DTYPE)
    batch = GMMBatch(points=torch.zeros(b, n, d, dtype=DTYPE), labels=labels, centres=centres,
                     weights=weights, sigma=sig, snr_db=torch.zeros(b, dtype=DTYPE),
                     k=(weights > 0).sum(1), centre_scale=torch.full((b,), 5.0, dtype=DTYPE),
                     weight_concentration=torch.full((b,), 5.0, dtype=DTYPE))
    batch.points = batch.target + sigma * torch.randn(b, n, d, generator=g, dtype=DTYPE)
    return batch


def unpadded(batch: GMMBatch, i: int) -> GMMBatch:
    """Set ``i`` alone, cut to its real points, without a mask."""
    one = batch.slice(i, i + 1)
    n = int(one.point_counts()[0])
    one.points, one.labels, one.mask = one.points[:, :n], one.labels[:, :n], None
    return one


def test_easy_data_ordering() -> None:
    """(The floor not told K, three times the floor's cost, is ordered in its own tests.)"""
    batch = bank(96)
    mse = {name: float(centre_mse_per_set(run_baseline(name, batch, EMConfig(), gen()).centres,
                                          batch.target).mean())
           for name in BASELINES if name != "bayes_unknown_k"}
    assert mse["oracle"] < mse["bayes"] <= mse["em_tied"] <= mse["em"] <= mse["kmeans"]
    assert mse["bayes"] <= mse["em_bic"] < mse["kmeans"] < mse["identity"]


def test_em_recovers_well_separated_clusters() -> None:
    angles = torch.tensor([0.0, 2.1, 4.2], dtype=DTYPE)
    ring = torch.stack([angles.cos(), angles.sin()], -1)  # 3 centres, pairwise distance ~1.7
    b = 24
    rotation = 2 * math.pi * torch.rand(b, generator=gen(1), dtype=DTYPE)
    cos, sin = rotation.cos()[:, None], rotation.sin()[:, None]
    centres = torch.stack([cos * ring[:, 0] - sin * ring[:, 1],
                           sin * ring[:, 0] + cos * ring[:, 1]], -1)  # [b, 3, 2]
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=DTYPE).expand(b, 3).contiguous()
    batch = hand_batch(centres, weights, sigma=0.1, n=200)
    result = run_baseline("em", batch, EMConfig(n_init=3), gen())
    ari = adjusted_rand_index(batch.labels, result.assignments)
    assert float(ari.min()) > 0.95


def test_oracle_matches_its_closed_form_in_1d() -> None:
    # Two components at -a and +a, equal weights, sigma = 1: c*(x) = a tanh(a x), and by
    # symmetry the expected error is E_{x ~ N(a, 1)} (a tanh(a x) - a)^2.
    a, b, n = 1.0, 8, 25_000
    centres = torch.tensor([[-a], [a]], dtype=DTYPE).expand(b, 2, 1).contiguous()
    weights = torch.full((b, 2), 0.5, dtype=DTYPE)
    batch = hand_batch(centres, weights, sigma=1.0, n=n, seed=3)
    pred = oracle_posterior_mean(batch.points, batch.centres, batch.weights, batch.sigma).centres
    assert torch.allclose(pred, a * torch.tanh(a * batch.points))
    errors = (pred - batch.target).square().flatten()
    x = np.linspace(a - 12, a + 12, 200_001)
    density = np.exp(-0.5 * (x - a) ** 2) / math.sqrt(2 * math.pi)
    expected = np.trapezoid((a * np.tanh(a * x) - a) ** 2 * density, x)
    standard_error = float(errors.std()) / math.sqrt(errors.numel())
    assert abs(float(errors.mean()) - expected) < 4 * standard_error
    assert float(centre_mse_per_set(pred, batch.target).mean()) == pytest.approx(
        float(errors.mean()), rel=1e-12)


def test_em_matches_scikit_learn_from_the_same_start() -> None:
    batch = bank(10, seed=5, sample_count_distribution=DistributionSpec(type="fixed", value=300))
    seeds = kmeans_plus_plus_init(batch.points, batch.k, None, gen(2))
    weights0, means0, var0 = initial_em_parameters(batch.points, batch.k, None, seeds)
    fit = fit_em(batch.points, batch.k, seeds=seeds, max_iter=100, tol=1e-6)
    for i in range(batch.num_sets):
        k, x = int(batch.k[i]), batch.points[i].numpy()
        gm = GaussianMixture(k, covariance_type="spherical", n_init=1, max_iter=100, tol=1e-6,
                             reg_covar=EM_REG_COVAR * x.var(axis=0).mean(),
                             weights_init=weights0[i, :k].numpy(),
                             means_init=means0[i, :k].numpy(),
                             precisions_init=1.0 / var0[i, :k].numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)
        assert int(fit.n_iter[i]) == gm.n_iter_
        np.testing.assert_allclose(fit.means[i, :k].numpy(), gm.means_, atol=1e-7)
        np.testing.assert_allclose(fit.weights[i, :k].numpy(), gm.weights_, atol=1e-8)
        np.testing.assert_allclose(fit.variances[i, :k].numpy(), gm.covariances_, rtol=1e-6)
        assert float(fit.log_likelihood[i]) == pytest.approx(gm.score(x), abs=1e-8)
        np.testing.assert_allclose(fit.responsibilities[i, :, :k].numpy(), gm.predict_proba(x),
                                   atol=1e-7)
        assert float(fit.weights[i, k:].abs().sum()) == 0.0


def tied_em_reference(x: np.ndarray, seeds: np.ndarray, tol: float = 1e-6,
                      max_iter: int = 100) -> tuple[np.ndarray, float, float]:
    """Tied spherical EM for one set, point by point from the definitions: (means, shared
    variance per coordinate, mean log-likelihood per point)."""
    n, d = x.shape
    k = len(seeds)
    reg = EM_REG_COVAR * x.var(0).mean()

    def m_step(resp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        nk = resp.sum(0) + 10 * np.finfo(float).eps
        means = (resp.T @ x) / nk[:, None]
        spread = sum(resp[i, j] * np.sum((x[i] - means[j]) ** 2)
                     for i in range(n) for j in range(k))
        return nk / nk.sum(), means, spread / (d * nk.sum()) + reg

    def e_step(w: np.ndarray, means: np.ndarray, var: float) -> tuple[np.ndarray, float]:
        log_p = np.array([[math.log(w[j]) - 0.5 * d * math.log(2 * math.pi * var)
                           - np.sum((x[i] - means[j]) ** 2) / (2 * var) for j in range(k)]
                          for i in range(n)])
        top = log_p.max(1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(log_p - top).sum(1))
        return np.exp(log_p - norm[:, None]), float(norm.mean())

    nearest = np.argmin(((x[:, None] - seeds[None]) ** 2).sum(-1), 1)
    w, means, var = m_step(np.eye(k)[nearest])
    previous = -math.inf
    for _ in range(max_iter):
        resp, ll = e_step(w, means, var)
        w, means, var = m_step(resp)
        if abs(ll - previous) < tol:
            break
        previous = ll
    return means, var, e_step(w, means, var)[1]


def test_tied_em_matches_a_slow_reference_from_the_same_start() -> None:
    batch = bank(6, seed=12, sample_count_distribution=DistributionSpec(type="fixed", value=40),
                 snr_db_params=DistributionSpec(type="uniform", min=3, max=12))
    seeds = kmeans_plus_plus_init(batch.points, batch.k, None, gen(3))
    fit = fit_em(batch.points, batch.k, seeds=seeds, tied=True)
    for i in range(batch.num_sets):
        k = int(batch.k[i])
        means, var, ll = tied_em_reference(batch.points[i].numpy(), seeds[i, :k].numpy())
        np.testing.assert_allclose(fit.means[i, :k].numpy(), means, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(fit.variances[i, :k].numpy(), var, rtol=1e-6)
        assert float(fit.log_likelihood[i]) == pytest.approx(ll, rel=1e-9)
    # The untied fit from the same start differs: the test sees the tying.
    loose = fit_em(batch.points, batch.k, seeds=seeds)
    assert not torch.allclose(loose.variances, fit.variances)


def test_em_bic_finds_the_number_of_clear_clusters() -> None:
    centres = torch.tensor([[[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0], [0.0, 0.0]],
                            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=DTYPE)
    weights = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=DTYPE)
    batch = hand_batch(centres, weights, sigma=0.5, n=150)
    result = run_baseline("em_bic", batch, EMConfig(), gen())
    assert result.k_hat.tolist() == [3, 1]
    assert float(centre_mse_per_set(result.centres, batch.target).max()) < 0.01
    assert run_baseline("em_tied", batch, EMConfig(), gen()).k_hat is None  # told K


def test_kmeans_matches_scikit_learn_from_the_same_start() -> None:
    batch = bank(10, seed=6)
    seeds = kmeans_plus_plus_init(batch.points, batch.k, batch.mask, gen(4))
    fit = fit_kmeans(batch.points, batch.k, seeds=seeds, max_iter=300)
    for i in range(batch.num_sets):
        k, x = int(batch.k[i]), batch.points[i].numpy()
        km = KMeans(k, init=seeds[i, :k].numpy(), n_init=1, max_iter=300, tol=0.0,
                    algorithm="lloyd").fit(x)
        np.testing.assert_allclose(fit.centroids[i, :k].numpy(), km.cluster_centers_,
                                   atol=1e-10)
        assert adjusted_rand_score(km.labels_, fit.assignments[i].numpy()) == 1.0
        assert float(fit.inertia[i]) == pytest.approx(km.inertia_, rel=1e-9)


def test_restarts_never_lower_the_likelihood() -> None:
    batch = bank(32, seed=7)
    one = fit_em(batch.points, batch.k, n_init=1, generator=gen(9))
    three = fit_em(batch.points, batch.k, n_init=3, generator=gen(9))
    # Restart 0 of the stacked batch draws the same seeds as the single run.
    assert bool((three.log_likelihood >= one.log_likelihood - 1e-12).all())
    km1 = fit_kmeans(batch.points, batch.k, n_init=1, generator=gen(9))
    km3 = fit_kmeans(batch.points, batch.k, n_init=3, generator=gen(9))
    assert bool((km3.inertia <= km1.inertia + 1e-12).all())


@pytest.mark.parametrize("name", BASELINES)
def test_padding_does_not_change_a_baseline(name: str) -> None:
    batch = bank(8, seed=8, ragged=True)
    assert batch.mask is not None and len(set(batch.point_counts().tolist())) > 1
    result = run_baseline(name, batch, EMConfig(), gen(1))
    # Extra padding filled with junk, same sets in the same places: the same answer.
    extra = 7
    wider = GMMBatch(**{**batch.__dict__,
                        "points": torch.cat([batch.points, torch.full_like(
                            batch.points[:, :extra], float("nan"))], 1),
                        "labels": torch.cat([batch.labels, batch.labels[:, :extra]], 1),
                        "mask": torch.cat([batch.mask, torch.zeros_like(
                            batch.mask[:, :extra])], 1)})
    other = run_baseline(name, wider, EMConfig(), gen(1))
    n = batch.points.shape[1]
    assert torch.allclose(other.centres[:, :n], result.centres, atol=1e-10)
    # Restarts that reach the same optimum with permuted components tie up to round-off, so
    # assignments are compared as partitions.
    ari = adjusted_rand_index(other.assignments[:, :n], result.assignments, batch.mask)
    assert torch.allclose(ari, torch.ones_like(ari))
    assert bool((other.centres[:, n:] == 0).all())
    if name in ("em_bic", "bayes", "bayes_unknown_k"):  # draws depend on the batch: no fixed start
        return
    # Each set alone, unpadded: the same answer (EM / k-means from the same seeds).
    seeds = kmeans_plus_plus_init(batch.points, batch.k, batch.mask, gen(2))
    tied = name == "em_tied"
    if name in ("em", "em_tied"):
        result = fit_em(batch.points, batch.k, batch.mask, seeds=seeds, tied=tied
                        ).result(batch.mask)
    elif name == "kmeans":
        result = fit_kmeans(batch.points, batch.k, batch.mask, seeds=seeds).result(batch.mask)
    for i in range(batch.num_sets):
        one = unpadded(batch, i)
        if name in ("em", "em_tied"):
            alone = fit_em(one.points, one.k, seeds=seeds[i:i + 1], tied=tied).result()
        elif name == "kmeans":
            alone = fit_kmeans(one.points, one.k, seeds=seeds[i:i + 1]).result()
        else:
            alone = run_baseline(name, one, EMConfig(), gen(1))
        m = int(one.points.shape[1])
        assert torch.allclose(alone.centres[0], result.centres[i, :m], atol=1e-10)
        assert torch.equal(alone.assignments[0], result.assignments[i, :m])


def test_kmeans_plus_plus_seeds_are_real_points() -> None:
    batch = bank(16, seed=10, ragged=True)
    seeds = kmeans_plus_plus_init(batch.points, batch.k, batch.mask, gen())
    for i in range(batch.num_sets):
        real = batch.points[i, batch.mask[i]]
        for j in range(int(batch.k[i])):
            assert bool((real == seeds[i, j]).all(-1).any())
        # k-means++ never picks a point twice while distinct points remain.
        assert len({tuple(s.tolist()) for s in seeds[i, :int(batch.k[i])]}) == int(batch.k[i])


def test_degenerate_sets_stay_finite() -> None:
    # One set of identical points, one with 2 distinct points for 4 components, one with a
    # single real point; K = 4 everywhere.
    points = torch.zeros(3, 6, 2, dtype=DTYPE)
    points[0] = 3.0
    points[1, :3] = torch.tensor([1.0, -1.0], dtype=DTYPE)
    points[1, 3:] = torch.tensor([-2.0, 0.5], dtype=DTYPE)
    points[2, 0] = torch.tensor([0.3, 0.7], dtype=DTYPE)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 1:] = False
    k = torch.full((3,), 4)
    centres = torch.randn(3, 4, 2, generator=gen(), dtype=DTYPE)
    batch = GMMBatch(points=points, labels=torch.zeros(3, 6, dtype=torch.long), centres=centres,
                     weights=torch.full((3, 4), 0.25, dtype=DTYPE),
                     sigma=torch.full((3,), 0.1, dtype=DTYPE), snr_db=torch.zeros(3, dtype=DTYPE),
                     k=k, mask=mask, centre_scale=torch.full((3,), 1.0, dtype=DTYPE),
                     weight_concentration=torch.full((3,), 5.0, dtype=DTYPE),
                     k_prior=torch.tensor([[0.0, 0.5, 0.0, 0.5]], dtype=DTYPE).repeat(3, 1))
    for name in BASELINES:
        result = run_baseline(name, batch, EMConfig(n_init=2, max_iter=50), gen())
        assert bool(torch.isfinite(result.centres).all()), name
    fit = fit_em(points, k, mask, n_init=2, generator=gen())
    assert bool(torch.isfinite(fit.means).all() & torch.isfinite(fit.variances).all())
    assert bool((fit.variances > 0).all()) and bool(torch.isfinite(fit.log_likelihood).all())
    # Predictions of real points are the points themselves here (each is its own cluster).
    pred = fit.result(mask).centres
    assert torch.allclose(pred[mask], points[mask], atol=1e-6)


def test_results_are_float64_and_reproducible() -> None:
    batch = validation_bank(DataConfig(), 11, 8, 8)[0]  # float32 data
    for name in BASELINES:
        a = run_baseline(name, batch, EMConfig(), gen(5))
        b = run_baseline(name, batch, EMConfig(), gen(5))
        assert a.centres.dtype == torch.float64 and a.assignments.dtype == torch.long
        assert torch.equal(a.centres, b.centres) and torch.equal(a.assignments, b.assignments)
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("gmm", batch, EMConfig(), gen())
