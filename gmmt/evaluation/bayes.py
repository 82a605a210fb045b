"""The Bayes floor: each point's posterior-mean centre under the generating prior, by MCMC.

The prior of a set (docs/design.md, "Drawing a set"), with K and sigma given:
pi ~ Dirichlet(alpha 1_K), mu_k ~ N(0, s^2 I_d), z_i ~ Categorical(pi),
x_i = mu_{z_i} + sigma eps_i.
The Bayes floor is E[mu_{z_i} | x, K, sigma] for every point, integrating over centres, weights
and labels: under this prior no estimator that sees only the points (and K and sigma) has a lower
expected squared error. It is invariant to relabelling the components, so label switching
between or within chains does no harm. (The generator sets sigma from the centres' spread; like
``GMMBatch.labelled_posterior_mean`` this treats sigma as known and independent of them.)

Sampler, per sweep, every chain of every set at once:

1. labels | centres, weights: responsibilities r_ik ∝ pi_k N(x_i; mu_k, sigma^2 I), then one
   inverse-CDF draw per point. Retained sweeps accumulate the Rao-Blackwellised estimate
   sum_k r_ik mu_k (the point's expected centre given mu and pi), not the sampled mu_{z_i};
2. centres | labels: the conjugate normal N(S_k / a_k, sigma^2 / a_k I), a_k = n_k + sigma^2 / s^2;
3. weights | labels: Dirichlet(alpha + n_k), as normalised gamma draws;
4. re-seeding, for each component in turn: a Metropolis-Hastings independence move on the
   marginal posterior of (mu, pi) (labels summed out) proposing mu_k' = x_j + tau eps, j a
   uniform real point, accepted with the exact ratio
   p(x | mu', pi) N(mu_k'; 0, s^2) q(mu_k) / [p(x | mu, pi) N(mu_k; 0, s^2) q(mu_k')],
   q(mu) = (1/n) sum_j N(mu; x_j, tau^2 I). Plain Gibbs sits for thousands of sweeps in a poor
   mode (two components sharing a cluster, one covering two); this move jumps out of it and
   leaves the posterior invariant (step 1 redraws the labels from the moved parameters, so the
   joint chain stays exact).

Several chains per set start from different random real points; their retained sweeps are
pooled for the estimate, and their disagreement flags sets the run did not settle.

Layout follows ``gmmt.evaluation.baselines``: chains are extra rows (row = chain * b + set),
points are augmented as xs = [x; |x|^2; 1] laid out [rows, d + 2, n] and per-component tensors
as [rows, k, n], so log-densities and sufficient statistics are single batched matmuls.
Components ``>= k`` of a set get zero weight and are never proposed; padded points (``mask``
False) carry no weight and get 0. Float64 (float32 on MPS).

Randomness comes only from the generator passed in. It is drawn as per-sweep seeds of fresh
generators, one per kind of draw, each drawn point-major or component-major: so padding a set
with extra points or extra (switched-off) components leaves its real draws, and its result,
unchanged.

Shape legend: ``b`` sets, ``n`` points, ``d`` dims, ``k`` components (K_max of the batch),
``c`` chains, ``r = c * b`` rows.
"""

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmmt.evaluation.baselines import (
    _argmin_k,
    _components,
    _inputs,
    _sample_index,
)

# Default chain_spread above which a set is flagged unconverged (units of sigma^2 per
# coordinate). With the defaults, on 2048 sets of the simple prior (K 2-4, 100-500 points),
# chains that agree differ by Monte-Carlo noise, median 7e-5 and 99th centile 4e-3; 16 sets
# (0.8 %) exceed 0.005, hard overlapping sets whose chains still weigh modes differently. The
# pooled estimate's squared Monte-Carlo error is ~spread / chains: at 0.005 about a tenth of
# the median set's Bayes MSE (0.0135 sigma^2), at the median spread ~0.1 % of it.
TOLERANCE = 0.005


@dataclass
class BayesFit:
    """The Bayes floor of every point, from :func:`bayes_posterior_mean`."""

    centres: Tensor  # [b, n, d] posterior-mean centre of each point (0 at padded points)
    # [b, n] long: each point's most probable component at the highest-posterior retained
    # state of all chains (a consistent labelling for ARI/NMI), 0 at padded points
    assignments: Tensor
    # [b] chains' disagreement: max over chains of the mean over real points of
    # |chain estimate - pooled estimate|^2 / (d sigma^2)
    chain_spread: Tensor
    unconverged: Tensor  # [b] bool, chain_spread > tolerance
    # [b] log p(x | K, sigma) by Chib's estimator (with ``evidence=True``; else None)
    log_evidence: Tensor | None = None


def _exp_density(xs: Tensor, mu: Tensor, log_pi: Tensor, comp: Tensor, sigma2: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Densities pi_c N(x_i; mu_c, sigma^2 I) of every point under candidate centres ``mu``
    [r, c, d] with log-weights ``log_pi`` [r, c] (``comp`` [r, c] False: switched off), scaled
    per point: (e [r, c, n] = exp(log density - top), top [r, n]); the Gaussian's normaliser,
    the same for every candidate and state, is left out.

    The scale top_i is the point's largest log-density over the candidates, so every sum over
    components that includes its best one is >= 1 and its logarithm exact. Terms more than
    e^-700 below it are floored there (exp of a smaller argument takes a slow path on CPU): only
    a state that leaves a point 37 sigma from every component notices, and none is visited
    after the first sweeps. Switched-off candidates get e = 0 exactly. Padded points (zero
    columns of xs) get log-density 0 everywhere: finite, and weighted 0 by the callers.
    """
    # log pi_c - |x - mu_c|^2 / (2 sigma^2) = 2h mu.x - h |x|^2 + (log pi_c - h |mu|^2),
    # h = 1 / (2 sigma^2): one matmul with [x; |x|^2; 1] (as in baselines._e_step). A finite
    # stand-in for log 0 keeps padded points' 0 * log_pi finite.
    h = (0.5 / sigma2).view(-1, 1, 1)
    constant = log_pi.clamp_min(-1e300).unsqueeze(-1) - h * mu.square().sum(-1, keepdim=True)
    coefficients = torch.cat([2 * h * mu, -h.expand_as(constant), constant], -1)
    # (einsum: bmm with an inner dimension of d + 2 is ~2x slower on CPU.)
    log_density = torch.einsum('rct,rtn->rcn', coefficients, xs)
    top = log_density.amax(1)
    e = log_density.sub_(top.unsqueeze(1)).clamp_min_(-700.0).exp_()
    return e.masked_fill_(~comp.unsqueeze(-1), 0.0), top


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def bayes_posterior_mean(points: Tensor, k: Tensor, sigma: Tensor, centre_scale: Tensor,
                         weight_concentration: Tensor, mask: Tensor | None = None, *,
                         num_chains: int = 4, burn_in: int = 100, num_samples: int = 200,
                         tolerance: float = TOLERANCE, evidence: bool = False,
                         generator: torch.Generator | None = None) -> BayesFit:
    """Posterior mean of every point's own centre under the generating prior (module docstring).

    Args:
        points [b, n, d]; k [b] long; sigma, centre_scale, weight_concentration [b] float;
        mask [b, n] bool or None.
        num_chains: chains per set, run as extra rows; all their retained sweeps are pooled.
        burn_in, num_samples: sweeps discarded, then kept, per chain. The defaults take ~3
        minutes for 2048 sets of 100-500 points, K 2-4, d 2 on two busy CPU cores; halving
        both moves the bank's mean MSE by 0.1 %.
        tolerance: chain_spread above which a set is marked unconverged (see TOLERANCE).
        evidence: also estimate each set's log evidence log p(x | K, sigma) (:func:`_chib`).
        generator: the only source of randomness (the same generator state, the same answer).
    """
    xs, m = _inputs(points, mask)  # [b, d + 2, n], [b, n]
    b, d, n = xs.shape[0], xs.shape[1] - 2, xs.shape[2]
    dtype, device = xs.dtype, xs.device
    k_max, c = int(k.max()), num_chains
    rows = c * b
    xs, m, k = xs.repeat(c, 1, 1), m.repeat(c, 1), k.to(torch.long).repeat(c)
    comp = _components(k, k_max)  # [r, k]
    real = m > 0
    count = m.sum(1)
    sigma2 = sigma.to(device, dtype).square().repeat(c)
    s2 = centre_scale.to(device, dtype).square().repeat(c)
    prior_ratio = sigma2 / s2
    alpha = weight_concentration.to(device, dtype).repeat(c).unsqueeze(1)

    # Seeds of per-sweep generators (labels, normals, gammas, uniforms), drawn up front in a
    # fixed number: the draws of a set never depend on the shapes of the batch.
    sweeps = burn_in + num_samples
    seeds = torch.randint(0, 2**62, (sweeps + 1, 4), generator=generator,
                          device=generator.device if generator is not None else "cpu").tolist()

    # Start: each component at a uniformly drawn real point (different per chain), equal weights.
    start = torch.rand((k_max, rows), generator=_seeded(seeds[0][0], device), device=device,
                       dtype=dtype).T
    index = _sample_index(m, start)  # [r, k]
    mu = xs[:, :d].gather(2, index.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)  # [r, k, d]
    log_pi = torch.where(comp, 0.0, -math.inf).to(dtype).log_softmax(1)

    estimate = xs.new_zeros(rows, d, n)  # sum over retained sweeps of sum_k r_ik mu_k
    best_score = xs.new_full((rows,), -math.inf)
    best_mu, best_log_pi = mu.clone(), log_pi.clone()
    e, top = _exp_density(xs, mu, log_pi, comp, sigma2)  # [r, k, n], [r, n]
    total = e.sum(1)  # [r, n]
    k_range = torch.arange(k_max, device=device).view(1, k_max, 1)
    retained_stats: list[Tensor] = []  # per retained sweep, [r, k, d + 2] (with ``evidence``)

    for sweep in range(sweeps):
        g_labels, g_normal, g_gamma, g_uniform = (_seeded(s, device) for s in seeds[sweep + 1])
        if sweep >= burn_in:
            # Rao-Blackwellised: sum_k r_ik mu_k with r_ik = e_ik / total_i.
            estimate += (mu.transpose(1, 2) @ e).div_(total.unsqueeze(1))
            # Log posterior density of (mu, pi) up to a constant, to keep each chain's best
            # state for the assignments.
            score = (((total.log() + top) * m).sum(1)
                     - (mu.square().sum(-1) * comp).sum(1) / (2 * s2)
                     + ((alpha - 1) * log_pi.masked_fill(~comp, 0.0)).sum(1))
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_mu = torch.where(better.view(-1, 1, 1), mu, best_mu)
            best_log_pi = torch.where(better.view(-1, 1), log_pi, best_log_pi)

        # 1. Labels by inverse CDF, point-major uniforms; switched-off components own an empty
        # interval, and the clamp catches a u above a total that rounded below 1.
        u = torch.rand((n, rows), generator=g_labels, device=device, dtype=dtype).T
        labels = (e.cumsum(1) < (u * total).unsqueeze(1)).sum(1)
        labels = torch.minimum(labels, (k - 1).unsqueeze(1))
        # Counts and sums per component (padded points are zero columns of xs: no weight).
        stats = (k_range == labels.unsqueeze(1)).to(dtype) @ xs.transpose(1, 2)  # [r, k, d+2]
        n_k = stats[..., d + 1]
        if evidence and sweep >= burn_in:
            retained_stats.append(stats)

        # 2. Centres from their conjugate normal; 3. weights from their Dirichlet.
        normal = torch.randn((k_max, rows, 2 * d), generator=g_normal, device=device,
                             dtype=dtype).transpose(0, 1)  # [r, k, 2d]: Gibbs, proposal
        uniform = torch.rand((k_max, rows, 3), generator=g_uniform, device=device,
                             dtype=dtype).transpose(0, 1)  # [r, k, 3]: gamma, point, accept
        a = (n_k + prior_ratio.unsqueeze(1)).unsqueeze(-1)  # [r, k, 1]
        mu = stats[..., :d] / a + (sigma2.view(-1, 1, 1) / a).sqrt() * normal[..., :d]
        mu = mu.masked_fill(~comp.unsqueeze(-1), 0.0)
        # Gamma(a) = Gamma(a + 1) U^(1/a) in log space: a plain Gamma(a) draw underflows to 0
        # for small a often enough to zero a real component's weight.
        concentration = alpha + n_k
        gamma = torch._standard_gamma((concentration + 1).T.contiguous(), generator=g_gamma).T
        log_gamma = gamma.log() + torch.log1p(-uniform[..., 0]) / concentration
        log_pi = log_gamma.masked_fill(~comp, -math.inf).log_softmax(1)

        # 4. Re-seeding: proposals mu_j' = x_p + tau eps (tau = sigma) for every component,
        # scored with the current centres in one matmul; e is scaled per point by the top over
        # both.
        point = _sample_index(m, uniform[..., 1].contiguous())  # [r, k]
        proposal = (xs[:, :d].gather(2, point.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)
                    + sigma2.sqrt().view(-1, 1, 1) * normal[..., d:])  # [r, k, d]
        candidates = torch.cat([mu, proposal], 1)  # [r, 2k, d]: current, proposed
        e, top = _exp_density(xs, candidates, log_pi.repeat(1, 2), comp.repeat(1, 2), sigma2)
        # With tau = sigma, q(mu_c) ∝ sum_p exp(-|mu_c - x_p|^2 / (2 sigma^2))
        # = sum_p e_cp exp(top_p) / pi_c: a matrix-vector product with the same exponentials.
        # (The log pi_c cancels between a component's current and proposed centre.)
        log_q = (e * (top.exp() * m).unsqueeze(1)).sum(-1).log()  # [r, 2k]
        log_prior = -candidates.square().sum(-1) / (2 * s2.unsqueeze(1))  # [r, 2k]
        e, moved = e[:, :k_max].clone(), e[:, k_max:]
        # Components move one at a time, each against the others' current state: the point
        # sums over the others are the prefix (already decided) plus the suffix (not yet).
        suffix = [torch.zeros_like(top)]
        for j in range(k_max - 1, 0, -1):
            suffix.append(suffix[-1] + e[:, j])
        prefix = torch.zeros_like(top)
        ll = (torch.log(suffix[-1] + e[:, 0]) * m).sum(1)  # [r], up to sum_i top_i
        for j in range(k_max):
            others = prefix + suffix[k_max - 1 - j]
            ll_moved = (torch.log(others + moved[:, j]) * m).sum(1)
            log_ratio = (ll_moved - ll + log_prior[:, k_max + j] - log_prior[:, j]
                         + log_q[:, j] - log_q[:, k_max + j])
            accept = (uniform[:, j, 2].log() < log_ratio) & comp[:, j] & (count > 0)
            mu[:, j] = torch.where(accept.unsqueeze(1), proposal[:, j], mu[:, j])
            e[:, j] = torch.where(accept.unsqueeze(1), moved[:, j], e[:, j])
            ll = torch.where(accept, ll_moved, ll)
            prefix += e[:, j]
        total = prefix

    # Pool the chains; their spread around the pooled estimate is the convergence check.
    per_chain = (estimate / max(num_samples, 1)).view(c, b, d, n)
    pooled = per_chain.mean(0)
    m_b, count_b = m[:b], count[:b].clamp_min(1.0)
    spread = ((per_chain - pooled).square().sum(2) * m_b).sum(-1)  # [c, b]
    chain_spread = (spread / (count_b * d * sigma2[:b])).amax(0)

    # Assignments at the best retained state over all chains of a set.
    best = best_score.view(c, b).argmax(0) * b + torch.arange(b, device=device)
    e = _exp_density(xs[:b], best_mu[best], best_log_pi[best], comp[:b], sigma2[:b])[0]
    assignments = _argmin_k(-e)[0].masked_fill(~real[:b], 0)
    centres = pooled.transpose(1, 2).masked_fill(~real[:b].unsqueeze(-1), 0.0)
    log_evidence = None
    if evidence:
        stats = torch.stack(retained_stats).view(num_samples * c, b, k_max, d + 2)
        log_evidence = _chib(xs[:b], m_b, comp[:b], best_mu[best], best_log_pi[best], stats,
                             sigma2[:b], s2[:b], alpha[:b, 0])
    return BayesFit(centres=centres, assignments=assignments, chain_spread=chain_spread,
                    unconverged=chain_spread > tolerance, log_evidence=log_evidence)


def _chib(xs: Tensor, m: Tensor, comp: Tensor, mu: Tensor, log_pi: Tensor, stats: Tensor,
          sigma2: Tensor, s2: Tensor, alpha: Tensor) -> Tensor:
    """log p(x | K, sigma) of every set by Chib's identity at a high-posterior state
    theta* = (mu [b, k, d], log_pi [b, k]):

        log p(x) = log p(x | theta*) + log p(theta*) - log p(theta* | x),

    with p(theta* | x) = E_z[p(theta* | z, x)] averaged over the retained label draws (their
    per-component counts and sums ``stats`` [t, b, k, d + 2], t draws pooled over chains).
    Given the labels, centres and weights are conjugate: N(mu_l; S_j / a_j, sigma^2 / a_j I)
    and Dirichlet(alpha + n_j). The posterior is symmetric in the component labels but a chain
    rarely visits all K! labellings, so the average also runs over every relabelling of
    theta* (Berkhof, Mechelen and Gelman's symmetrised estimator): with it the estimate does
    not depend on which labelling the chains sat in. Switched-off components (``comp`` False)
    are matched only with each other. Cost: t * K_max! terms per set.
    """
    d = mu.shape[-1]
    k_max = comp.shape[1]
    real_k = comp.sum(1).to(xs.dtype)  # [b] the set's K
    count = m.sum(1)
    log_2pi = math.log(2 * math.pi)
    # log p(x | theta*), with the Gaussian's normaliser.
    e, top = _exp_density(xs, mu, log_pi, comp, sigma2)
    log_likelihood = (((e.sum(1).log() + top) * m).sum(1)
                      - 0.5 * d * count * (log_2pi + sigma2.log()))
    # log p(theta*): N(0, s^2 I) centres and a Dirichlet(alpha 1_K) weight vector.
    log_pi_real = log_pi.masked_fill(~comp, 0.0)
    log_prior = ((-0.5 * d * (log_2pi + s2.log())).unsqueeze(1)
                 - mu.square().sum(-1) / (2 * s2.unsqueeze(1))).masked_fill(~comp, 0.0).sum(1)
    log_prior += (torch.lgamma(real_k * alpha) - real_k * torch.lgamma(alpha)
                  + ((alpha - 1).unsqueeze(1) * log_pi_real).sum(1))
    # log p(theta*_sigma | z_t, x) = g_t + sum_j f_t[j, sigma(j)] for a relabelling sigma.
    n_k, sums = stats[..., d + 1], stats[..., :d]  # [t, b, k], [t, b, k, d]
    a = n_k + (sigma2 / s2).view(1, -1, 1)  # [t, b, k]
    posterior_means = sums / a.unsqueeze(-1)
    distance = (posterior_means.unsqueeze(3) - mu.view(1, *mu.shape[:1], 1, k_max, d)
                ).square().sum(-1)  # [t, b, j, l]
    s2_row = sigma2.view(1, -1, 1, 1)
    f = (0.5 * d * (a.unsqueeze(-1) / s2_row).log() - 0.5 * d * log_2pi
         - a.unsqueeze(-1) * distance / (2 * s2_row)
         + (alpha.view(1, -1, 1, 1) + n_k.unsqueeze(-1) - 1) * log_pi_real.view(
             1, *log_pi.shape[:1], 1, k_max))
    both = comp.unsqueeze(2) & comp.unsqueeze(1)  # [b, j, l]
    neither = ~comp.unsqueeze(2) & ~comp.unsqueeze(1)
    f = torch.where(both, f, torch.where(neither, 0.0, -math.inf))
    alpha_t = alpha.view(1, -1, 1)
    g = (torch.lgamma(real_k * alpha + count).unsqueeze(0)
         - torch.lgamma(alpha_t + n_k).masked_fill(~comp.unsqueeze(0), 0.0).sum(-1))  # [t, b]
    # Chunks of relabellings keep memory at t * b * chunk * k.
    total = torch.full_like(g, -math.inf)
    relabellings = torch.tensor(list(itertools.permutations(range(k_max))), device=xs.device)
    j = torch.arange(k_max, device=xs.device)
    for chunk in relabellings.split(max(1, 2**16 // k_max)):
        terms = f[:, :, j.unsqueeze(0), chunk].sum(-1)  # [t, b, chunk]
        total = torch.logaddexp(total, (g.unsqueeze(-1) + terms).logsumexp(-1))
    # Valid relabellings per set: K! (K_max - K)!.
    valid = torch.lgamma(real_k + 1) + torch.lgamma(k_max - real_k + 1)
    log_posterior = total.logsumexp(0) - math.log(stats.shape[0]) - valid
    return log_likelihood + log_prior - log_posterior
