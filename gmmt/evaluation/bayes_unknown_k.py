"""The Bayes floor when K is not told: the posterior over K, and the centres averaged over it.

The floor of :mod:`gmmt.evaluation.bayes` is told K and sigma. Told only sigma, the best any
method can do is the posterior mean averaged over K:

    E[mu_{z_i} | x, sigma] = sum_K P(K | x, sigma) E[mu_{z_i} | x, K, sigma],
    P(K | x, sigma) ∝ P(K) p(x | K, sigma),

with P(K) the generating prior's distribution of K and the evidence p(x | K, sigma) from
Chib's estimator on the same Gibbs runs (``bayes_posterior_mean(..., evidence=True)``). Its
argmax is also the Bayes-optimal count: no method that sees only the points (and sigma) picks
the right K more often on average.

Cost: one Gibbs run per K in the prior's support.

Shape legend: b sets, n points, d dims, k components (K_max).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmmt.config.data import DistributionSpec
from gmmt.data.distributions import sample
from gmmt.evaluation.bayes import bayes_posterior_mean

# Draws of K that estimate its prior when the distribution has no closed form here.
PRIOR_DRAWS = 2**22


@dataclass
class BayesUnknownKFit:
    """The floor not told K, from :func:`bayes_unknown_k`."""

    centres: Tensor  # [b, n, d] posterior-mean centre of each point (0 at padded points)
    k_probabilities: Tensor  # [b, k] P(K = 1..K_max | x, sigma)
    k_hat: Tensor  # [b] long, the most probable K
    unconverged: Tensor  # [b] bool, some K's chains disagree (see bayes.TOLERANCE)


def k_prior(spec: DistributionSpec, k_max: int) -> Tensor:
    """P(K = 1..k_max) [k_max] of the generating prior's ``cluster_params`` (K is drawn as an
    integer and capped at k_max, as ``sample_gmm_batch`` does). Fixed and uniform are exact;
    other families are estimated from PRIOR_DRAWS draws."""
    values = torch.arange(1, k_max + 1, dtype=torch.float64)
    if spec.type == "fixed":
        probs = (values == min(round(spec.value), k_max)).double()
    elif spec.type == "uniform":
        probs = ((values >= math.ceil(spec.min)) & (values <= math.floor(spec.max))).double()
    else:
        draws = sample(spec, (PRIOR_DRAWS,), torch.Generator().manual_seed(0), integer=True)
        probs = torch.bincount(draws.clamp(1, k_max) - 1, minlength=k_max).double()
    return probs / probs.sum()


@torch.no_grad()
def bayes_unknown_k(points: Tensor, prior: Tensor, sigma: Tensor, centre_scale: Tensor,
                    weight_concentration: Tensor, mask: Tensor | None = None, *,
                    num_chains: int = 4, burn_in: int = 100, num_samples: int = 200,
                    generator: torch.Generator | None = None) -> BayesUnknownKFit:
    """The Bayes floor told sigma but not K (module docstring).

    Args:
        points [b, n, d]; prior [k]: P(K = 1..K_max) (:func:`k_prior`); sigma, centre_scale,
        weight_concentration [b]; mask [b, n] bool or None.
        num_chains, burn_in, num_samples: the sampler's, for every K.
        generator: the only source of randomness.
    """
    b = points.shape[0]
    k_max = prior.shape[0]
    log_posterior = torch.full((b, k_max), -math.inf, dtype=torch.float64, device=points.device)
    per_k: dict[int, Tensor] = {}
    unconverged = torch.zeros(b, dtype=torch.bool, device=points.device)
    for k in (prior > 0).nonzero().squeeze(1).tolist():
        fit = bayes_posterior_mean(
            points, torch.full((b,), k + 1, device=points.device), sigma, centre_scale,
            weight_concentration, mask, num_chains=num_chains, burn_in=burn_in,
            num_samples=num_samples, evidence=True, generator=generator)
        log_posterior[:, k] = fit.log_evidence.double() + prior[k].log()
        per_k[k] = fit.centres
        unconverged |= fit.unconverged
    probs = torch.softmax(log_posterior, 1)
    centres = torch.zeros_like(points)
    for k, k_centres in per_k.items():
        centres += probs[:, k].to(points.dtype).view(b, 1, 1) * k_centres.to(points.dtype)
    return BayesUnknownKFit(centres=centres, k_probabilities=probs,
                            k_hat=probs.argmax(1) + 1, unconverged=unconverged)
