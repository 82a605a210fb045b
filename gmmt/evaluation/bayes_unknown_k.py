"""The Bayes floor when K is not told: the posterior over K, and the centres averaged over it.

The floor of :mod:`gmmt.evaluation.bayes` is told K and sigma. Told only sigma, the best any
method can do is the posterior mean averaged over K:

    E[mu_{z_i} | x, sigma] = sum_K P(K | x, sigma) E[mu_{z_i} | x, K, sigma],
    P(K | x, sigma) ∝ P(K) p(x | K, sigma),

with P(K) the generating prior's distribution of K (``GMMBatch.k_prior``, from
``gmmt.data.distributions.integer_probabilities``) and the evidence p(x | K, sigma) from
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

from gmmt.evaluation.bayes import bayes_posterior_mean


@dataclass
class BayesUnknownKFit:
    """The floor not told K, from :func:`bayes_unknown_k`."""

    # [b, n, d] posterior-mean centre of each point (0 at padded points), the sampler's dtype
    centres: Tensor
    assignments: Tensor  # [b, n] long, the floor's assignments at the most probable K
    k_probabilities: Tensor  # [b, k] P(K = 1..K_max | x, sigma)
    k_hat: Tensor  # [b] long, the most probable K
    unconverged: Tensor  # [b] bool, some K's chains disagree (see bayes.TOLERANCE)


@torch.no_grad()
def bayes_unknown_k(points: Tensor, prior: Tensor, sigma: Tensor, centre_scale: Tensor,
                    weight_concentration: Tensor, mask: Tensor | None = None, *,
                    num_chains: int = 4, burn_in: int = 100, num_samples: int = 200,
                    generator: torch.Generator | None = None) -> BayesUnknownKFit:
    """The Bayes floor told sigma but not K (module docstring).

    Args:
        points [b, n, d]; prior [b, k]: P(K = 1..K_max) of each set's prior; sigma,
        centre_scale, weight_concentration [b]; mask [b, n] bool or None.
        num_chains, burn_in, num_samples: the sampler's, for every K.
        generator: the only source of randomness.
    """
    b = points.shape[0]
    k_max = prior.shape[1]
    prior = prior.to(points.device, torch.float64)
    log_posterior = torch.full((b, k_max), -math.inf, dtype=torch.float64, device=points.device)
    per_k: dict[int, tuple[Tensor, Tensor]] = {}
    unconverged = torch.zeros(b, dtype=torch.bool, device=points.device)
    for k in (prior > 0).any(0).nonzero().squeeze(1).tolist():
        fit = bayes_posterior_mean(
            points, torch.full((b,), k + 1, device=points.device), sigma, centre_scale,
            weight_concentration, mask, num_chains=num_chains, burn_in=burn_in,
            num_samples=num_samples, evidence=True, generator=generator)
        log_posterior[:, k] = fit.log_evidence.double() + prior[:, k].log()
        per_k[k] = fit.centres, fit.assignments
        unconverged |= fit.unconverged
    probs = torch.softmax(log_posterior, 1)
    k_hat = probs.argmax(1) + 1
    centres = torch.zeros_like(next(iter(per_k.values()))[0])  # the sampler's dtype
    assignments = torch.zeros(points.shape[:2], dtype=torch.long, device=points.device)
    for k, (k_centres, k_assignments) in per_k.items():
        centres += probs[:, k].to(centres.dtype).view(b, 1, 1) * k_centres
        assignments = torch.where((k_hat == k + 1).unsqueeze(1), k_assignments, assignments)
    return BayesUnknownKFit(centres=centres, assignments=assignments, k_probabilities=probs,
                            k_hat=k_hat, unconverged=unconverged)
