"""The Bayes floor sampler (gmmt/evaluation/bayes.py) against exact answers and its contracts."""

import itertools
import math

import pytest
import torch

from gmmt.evaluation.bayes import bayes_posterior_mean


def _enumerate(x: torch.Tensor, k: int, sigma: float, s: float,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x, z | K) [L] of every labelling z of one set x [n, d], and each point's posterior
    mean centre given z [L, n, d].

    p(z | x) ∝ DirichletMultinomial(z; alpha) prod_k p(x_k), where per coordinate the points
    of cluster k are jointly N(0, sigma^2 I + s^2 11^T); given z the point's centre has
    posterior mean S_{z_i} / (n_{z_i} + sigma^2 / s^2).
    """
    x = x.to(torch.float64)
    n, d = x.shape
    z = torch.tensor(list(itertools.product(range(k), repeat=n)))  # [L, n]
    one_hot = torch.nn.functional.one_hot(z, k).to(torch.float64)  # [L, n, k]
    counts = one_hot.sum(1)  # [L, k]
    sums = one_hot.transpose(1, 2) @ x  # [L, k, d]
    squares = one_hot.transpose(1, 2) @ x.square()  # [L, k, d]
    lg = torch.special.gammaln
    log_prior = (lg(torch.tensor(k * alpha)) - lg(torch.tensor(n + k * alpha))
                 + (lg(counts + alpha) - lg(torch.tensor(alpha))).sum(1))
    # log N(y; 0, sigma^2 I + s^2 11^T) of a cluster's coordinate y (n_k entries):
    # det = sigma^(2(n_k - 1)) (sigma^2 + n_k s^2), and
    # y^T inv y = (|y|^2 - s^2 (sum y)^2 / (sigma^2 + n_k s^2)) / sigma^2.
    v = sigma**2 + counts * s**2  # [L, k]
    quad = (squares - s**2 * sums.square() / v.unsqueeze(-1)) / sigma**2  # [L, k, d]
    log_det = (counts - 1) * math.log(sigma**2) + v.log()
    log_lik = -0.5 * (quad.sum(-1) + d * log_det + d * counts * math.log(2 * math.pi)).sum(1)
    means = sums / (counts + sigma**2 / s**2).unsqueeze(-1)  # [L, k, d]
    return log_prior + log_lik, torch.gather(means, 1, z.unsqueeze(-1).expand(-1, -1, d))


def _exact_posterior_mean(x: torch.Tensor, k: int, sigma: float, s: float,
                          alpha: float) -> torch.Tensor:
    """E[mu_{z_i} | x] [n, d] for one set x [n, d] by enumerating every labelling z."""
    log_joint, own = _enumerate(x, k, sigma, s, alpha)
    return (torch.softmax(log_joint, 0).view(-1, 1, 1) * own).sum(0)


def _exact_log_evidence(x: torch.Tensor, k: int, sigma: float, s: float, alpha: float) -> float:
    """log p(x | K, sigma) of one set, summing p(x, z | K) over every labelling z."""
    return _enumerate(x, k, sigma, s, alpha)[0].logsumexp(0).item()


def _sets(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six 8-point sets with K = 2 (d dims), from well separated to fully overlapping, and
    their sigmas."""
    g = torch.Generator().manual_seed(seed)
    separations = torch.tensor([6.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # in units of sigma
    sigma = torch.full((6,), 0.3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    centre = torch.zeros(6, 2, d, dtype=torch.float64)
    centre[:, 1, 0] = separations * sigma
    noise = torch.randn((6, 8, d), generator=g, dtype=torch.float64)
    return centre[:, labels] + sigma.view(-1, 1, 1) * noise, sigma


@pytest.mark.parametrize("d", [1, 2])
def test_matches_exact_enumeration(d: int) -> None:
    x, sigma = _sets(d, seed=d)
    s, alpha = 0.8, 2.0
    k = torch.full((6,), 2)
    fit = bayes_posterior_mean(x, k, sigma, torch.full((6,), s), torch.full((6,), alpha),
                               num_chains=4, burn_in=100, num_samples=1500,
                               generator=torch.Generator().manual_seed(0))
    exact = torch.stack([_exact_posterior_mean(x[i], 2, 0.3, s, alpha) for i in range(6)])
    # Monte-Carlo error here is ~0.005 (0.02 sigma); changing alpha from 2 to 5 or s from 0.8
    # to 0.5 moves the exact answer by 0.01-0.16, and ignoring either cluster by 0.05-1.2.
    assert (fit.centres - exact).abs().max().item() < 0.05 * 0.3
    assert not fit.unconverged.any()


def _clusters(centres: list[list[float]], sizes: list[int], sigma: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [n, 2] around ``centres`` with ``sizes`` points each, and their labels [n]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    mu = torch.tensor(centres, dtype=torch.float64)[labels]
    return mu + sigma * torch.randn((len(labels), 2), generator=g, dtype=torch.float64), labels


def _fit(points, k, sigma, mask=None, seed=0, **kwargs):
    b = points.shape[0]
    return bayes_posterior_mean(points, torch.tensor(k), torch.tensor(sigma, dtype=torch.float64),
                                torch.ones(b), torch.full((b,), 5.0), mask,
                                generator=torch.Generator().manual_seed(seed), **kwargs)


def test_padding_changes_nothing() -> None:
    """Set A's answer is the same whether it is padded with junk points and switched-off
    components (batched with a longer set of K = 4) or not (batched with a K = 2 set of its
    own length)."""
    a, _ = _clusters([[0.0, 0.0], [0.5, 0.2]], [12, 8], 0.15, seed=1)
    b, _ = _clusters([[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, -1.0]], [8] * 4, 0.1, seed=2)
    padded_a = torch.cat([a, torch.full((12, 2), math.nan, dtype=torch.float64)])
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 20:] = False
    padded = _fit(torch.stack([padded_a, b]), [2, 4], [0.15, 0.1], mask)
    plain = _fit(torch.stack([a, b[:20]]), [2, 2], [0.15, 0.1])
    torch.testing.assert_close(padded.centres[0, :20], plain.centres[0], rtol=0, atol=1e-10)
    assert torch.equal(padded.assignments[0, :20], plain.assignments[0])
    torch.testing.assert_close(padded.chain_spread[0], plain.chain_spread[0], rtol=1e-6, atol=0)
    assert (padded.centres[0, 20:] == 0).all() and (padded.assignments[0, 20:] == 0).all()
    assert padded.centres.isfinite().all()
    # A's four-component neighbour did not leak into A: never more than K labels used.
    assert padded.assignments[0, :20].max() <= 1


def test_deterministic_given_the_generator() -> None:
    x, _ = _clusters([[0.0, 0.0], [0.4, 0.0]], [10, 10], 0.15, seed=3)
    args = (x.unsqueeze(0), [2], [0.15])
    first, again, other = _fit(*args, seed=7), _fit(*args, seed=7), _fit(*args, seed=8)
    for name in ("centres", "assignments", "chain_spread"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.centres, other.centres)


def test_unconverged_flags_disagreeing_chains() -> None:
    """With the defaults, the chains agree to Monte-Carlo noise on an easy set (three clusters
    20 sigma apart; its assignments are the true clustering) and on a hard one (three clusters
    within 2 sigma): neither is flagged (spreads measured 6e-4 and 2e-3). Scored from their
    random starts (no burn-in, two sweeps) the chains disagree and both are flagged (37 and
    0.29)."""
    easy, labels = _clusters([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [20, 15, 10], 0.1, seed=4)
    hard, _ = _clusters([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2]], [20, 15, 10], 0.1, seed=5)
    points = torch.stack([easy, hard])
    fit = _fit(points, [3, 3], [0.1, 0.1])
    assert not fit.unconverged.any() and fit.chain_spread[0] < 5e-3  # measured 6e-4
    pairs = set(zip(fit.assignments[0].tolist(), labels.tolist()))
    assert len(pairs) == 3 and len({p for p, _ in pairs}) == 3
    rushed = _fit(points, [3, 3], [0.1, 0.1], burn_in=0, num_samples=2)
    assert rushed.unconverged.all()


def test_evidence_matches_exact_enumeration() -> None:
    """Chib's estimate of log p(x | K, sigma) on 8-point sets, K = 1-3, from well separated to
    overlapping, against the sum over every labelling. The error measured was 0 for K = 1
    (exact: one component's posterior does not depend on the labels) and at most 0.09 nats
    for K = 2-3; a wrong K is 0.5-5 nats away on these sets."""
    x, _ = _sets(2, seed=5)
    x = x[[0, 2, 4]]
    s, alpha, sigma = 0.8, 2.0, 0.3
    for k in (1, 2, 3):
        fit = bayes_posterior_mean(x, torch.full((3,), k), *(torch.full((3,), v, dtype=x.dtype)
                                                             for v in (sigma, s, alpha)),
                                   num_chains=4,
                                   burn_in=100, num_samples=500, evidence=True,
                                   generator=torch.Generator().manual_seed(1))
        exact = torch.tensor([_exact_log_evidence(x[i], k, sigma, s, alpha) for i in range(3)])
        tolerance = 1e-5 if k == 1 else 0.15  # 1e-5: the enumeration has float32 parts
        torch.testing.assert_close(fit.log_evidence, exact.to(fit.log_evidence.dtype),
                                   rtol=0, atol=tolerance)


def test_evidence_of_a_padded_set_is_its_own() -> None:
    """A set batched with a longer, larger-K one (padded points, switched-off components)
    gets the same evidence as alone."""
    a, _ = _clusters([[0.0, 0.0], [0.5, 0.2]], [12, 8], 0.15, seed=1)
    b, _ = _clusters([[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, -1.0]], [8] * 4, 0.1, seed=2)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 20:] = False
    padded_a = torch.cat([a, torch.zeros(12, 2, dtype=torch.float64)])
    padded = _fit(torch.stack([padded_a, b]), [2, 4], [0.15, 0.1], mask, evidence=True)
    plain = _fit(torch.stack([a, b[:20]]), [2, 2], [0.15, 0.1], evidence=True)
    torch.testing.assert_close(padded.log_evidence[0], plain.log_evidence[0], rtol=0, atol=1e-8)
    assert plain.log_evidence.isfinite().all() and padded.log_evidence.isfinite().all()
