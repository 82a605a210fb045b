"""The Bayes floor not told K (gmmt/evaluation/bayes_unknown_k.py) and the prior over K it
needs (gmmt/data/distributions.integer_probabilities)."""

import math

import torch

from gmmt.config.data import DistributionSpec
from gmmt.data.distributions import integer_probabilities
from gmmt.evaluation.bayes import bayes_posterior_mean
from gmmt.evaluation.bayes_unknown_k import bayes_unknown_k


def k_prior(spec: DistributionSpec, k_max: int, sets: int = 1) -> torch.Tensor:
    return integer_probabilities(spec, k_max).expand(sets, -1)


def test_k_prior_of_the_preset_families() -> None:
    uniform = k_prior(DistributionSpec(type="uniform", min=2, max=4), 5)
    torch.testing.assert_close(uniform[0],
                               torch.tensor([0, 1, 1, 1, 0], dtype=torch.float64) / 3)
    fixed = k_prior(DistributionSpec(type="fixed", value=3), 4)
    assert fixed[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    # Drawn, then capped at K_max as the generator does: 7 and 9 both count as K = 5.
    choice = k_prior(DistributionSpec(type="choice", values=[2, 7, 9], probs=[0.5, 0.25, 0.25]),
                     5)
    torch.testing.assert_close(choice[0], torch.tensor([0, 0.5, 0, 0, 0.5], dtype=torch.float64))
    # No closed form here: estimated from draws (Poisson(3), 0 counted as 1, capped at 5).
    poisson = k_prior(DistributionSpec(type="poisson", rate=3), 5)[0]
    exact = [math.exp(-3) * 3**j / math.factorial(j) for j in range(5)]
    expected = torch.tensor([exact[0] + exact[1], *exact[2:5], 0.0], dtype=torch.float64)
    expected[-1] = 1 - expected.sum()
    torch.testing.assert_close(poisson, expected, rtol=0, atol=2e-3)


def _set(centres: list[list[float]], size: int, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % len(centres)
    mu = torch.tensor(centres, dtype=torch.float64)[labels]
    return mu + sigma * torch.randn((size, 2), generator=g, dtype=torch.float64)


def test_counts_clear_clusters_and_matches_the_told_k_floor_there() -> None:
    """Two, three and four clusters 10 sigma apart: the posterior over K (prior 2-4) puts
    most of its mass on the true K (measured 0.94-0.99 over sampler seeds; the rest is on
    K + 1, one cluster split), and the centres are the floor told K."""
    sigma = 0.1
    corners = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    points = torch.stack([_set(corners[:k], 60, sigma, seed=k) for k in (2, 3, 4)])
    prior = k_prior(DistributionSpec(type="uniform", min=2, max=4), 4, sets=3)
    scale, alpha = torch.ones(3, dtype=torch.float64), torch.full((3,), 5.0, dtype=torch.float64)
    sigmas = torch.full((3,), sigma, dtype=torch.float64)
    fit = bayes_unknown_k(points, prior, sigmas, scale, alpha,
                          generator=torch.Generator().manual_seed(0))
    assert fit.k_hat.tolist() == [2, 3, 4]
    assert (fit.k_probabilities[[0, 1, 2], [1, 2, 3]] > 0.9).all()
    assert (fit.k_probabilities[:, 0] == 0).all()  # K = 1 is outside the prior
    told = bayes_posterior_mean(points, torch.tensor([2, 3, 4]), sigmas, scale, alpha,
                                generator=torch.Generator().manual_seed(1))
    # A centre is sigma / sqrt(20) from its points' mean: 0.05 sigma is a small part of that.
    torch.testing.assert_close(fit.centres, told.centres, rtol=0, atol=0.05 * sigma)


def test_overlapping_clusters_spread_the_posterior_over_k() -> None:
    """Two clusters 1.5 sigma apart are not clearly two: the posterior keeps real mass on
    K = 1 and K = 2, and the centres lie between the two told-K answers."""
    sigma = 0.2
    points = _set([[0.0, 0.0], [0.3, 0.0]], 40, sigma, seed=9).unsqueeze(0)
    prior = k_prior(DistributionSpec(type="uniform", min=1, max=2), 2)  # [1, 2]
    args = (torch.tensor([sigma], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
            torch.full((1,), 5.0, dtype=torch.float64))
    fit = bayes_unknown_k(points, prior, *args, generator=torch.Generator().manual_seed(0))
    assert 0.05 < fit.k_probabilities[0, 0] < 0.95
    assert torch.allclose(fit.k_probabilities.sum(1), torch.ones(1, dtype=torch.float64))
