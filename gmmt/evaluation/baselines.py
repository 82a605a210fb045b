"""Classical answers to the task, batched across sets in torch (formulas in docs/design.md).

* ``identity``: c(x) = x (assignments: each point's nearest true centre);
* ``oracle``: the posterior mean with the true parameters, the best denoiser given them
  (unattainable from the points alone);
* ``em_tied``: EM for a spherical GMM with the true K and ONE variance shared by the set's
  components, the generator's own model class; k-means++ initialisation, ``n_init`` restarts;
* ``em``: the same with one variance per component (scikit-learn's
  ``covariance_type="spherical"``), a looser model than the data's;
* ``em_bic``: tied EM for every K = 1..K_max of the batch, the K with the lowest BIC kept: the
  classical answer when K is not told;
* ``kmeans``: Lloyd's k-means with the true K, k-means++ initialisation, ``n_init`` restarts;
* ``bayes``: the posterior mean under the generating prior given K and sigma
  (:mod:`gmmt.evaluation.bayes`), the floor for anything that sees only the points;
* ``bayes_unknown_k``: the same given sigma but not K, averaged over the posterior over K
  (:mod:`gmmt.evaluation.bayes_unknown_k`): the floor for methods that choose K, and its most
  probable K the best count.

Both fits seed with greedy k-means++ as scikit-learn does (several candidates per seed, the
best kept): plain k-means++ leaves EM in a bad local optimum far more often.

Sets with different K and N run in one call: components ``>= k`` of a set are switched off
(weight zero) and padded points (``mask`` False) carry no weight. Restarts are stacked along the
set dimension, so a call is a fixed number of batched tensor ops per iteration, on any device,
in float64 (float32 on MPS). Randomness comes only from the ``torch.Generator`` passed in: a
fixed number of uniform draws per set and seed, turned into points by inverse-CDF sampling, so
a set's seeds do not depend on how many points the other sets have or how much padding it
carries.

Internally the points are kept augmented as xs = [x; |x|^2; 1] laid out [b, d + 2, n] (zero
columns for padded points), and per-component tensors as [b, k, n]: squared distances and
log-densities are then one batched matmul of a [b, k, d + 2] coefficient matrix with xs, the
sufficient statistics one matmul of the responsibilities with xs, and reductions over the
small k add a few contiguous rows of length n. On CPU this is several times faster than
[b, n, k] tensors with broadcasting, whose reductions run over a last dimension of size 2..15.

Shape legend: ``b`` sets, ``n`` points, ``d`` dims, ``k`` components (K_max of the batch).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmmt.config.validation import BayesConfig, EMConfig
from gmmt.data.batch import GMMBatch, posterior_logits
from gmmt.evaluation.metrics import clean_points, induced_clusters

BASELINES = ("identity", "oracle", "bayes", "bayes_unknown_k", "em_tied", "em", "em_bic",
             "kmeans")
# EM's variance regulariser, relative to each set's per-coordinate variance: the analogue of
# scikit-learn's absolute reg_covar=1e-6, made scale-free like the model (set normalisation).
EM_REG_COVAR = 1e-6
# A component whose total responsibility falls below this is empty: it keeps its previous mean
# and variance instead of dividing ~0 by ~0.
_EMPTY = 1e-10


@dataclass
class BaselineResult:
    """A baseline's answer for every point."""

    centres: Tensor  # [b, n, d] predicted centre of each point (zero on padded points)
    # [b, n] long, component of each point (0 on padded points); None where not computed
    assignments: Tensor | None
    k_hat: Tensor | None = None  # [b] long, the number of clusters, where the method chose it
    unconverged: Tensor | None = None  # [b] bool, where the method checks its own convergence


@dataclass
class EMFit:
    """A spherical GMM fitted by :func:`fit_em` (the best restart per set).

    Components ``>= k`` of a set have weight 0 (their other entries are placeholders).
    """

    means: Tensor  # [b, k, d]
    weights: Tensor  # [b, k]
    variances: Tensor  # [b, k], per coordinate (all equal within a set when tied)
    log_likelihood: Tensor  # [b], mean per real point, at the returned parameters
    responsibilities: Tensor  # [b, n, k] at the returned parameters (0 on padded points)
    n_iter: Tensor  # [b] long, EM iterations run (as scikit-learn's n_iter_)
    converged: Tensor  # [b] bool

    def result(self, mask: Tensor | None = None) -> BaselineResult:
        """Posterior-mean centre sum_k r_k mu_k and argmax-responsibility assignment."""
        centres = self.responsibilities @ self.means
        # argmax over a strided last dim is ~8x slower on CPU than a copy plus argmax.
        return _result(centres, self.responsibilities.contiguous().argmax(-1), mask)


@dataclass
class KMeansFit:
    """k-means centroids fitted by :func:`fit_kmeans` (the best restart per set)."""

    centroids: Tensor  # [b, k, d]; rows >= k of a set are placeholders
    assignments: Tensor  # [b, n] long (0 on padded points)
    inertia: Tensor  # [b], sum of squared distances of real points to their centroid
    n_iter: Tensor  # [b] long, centroid updates until the set's assignments stopped changing

    def result(self, mask: Tensor | None = None) -> BaselineResult:
        """Each point's assigned centroid."""
        index = self.assignments.unsqueeze(-1).expand(-1, -1, self.centroids.shape[-1])
        return _result(torch.gather(self.centroids, 1, index), self.assignments, mask)


def _result(centres: Tensor, assignments: Tensor, mask: Tensor | None) -> BaselineResult:
    if mask is not None:
        centres = centres.masked_fill(~mask.unsqueeze(-1), 0.0)
        assignments = assignments.masked_fill(~mask, 0)
    return BaselineResult(centres, assignments)


def _inputs(points: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The augmented points xs = [x; |x|^2; 1], [b, d + 2, n] in the work dtype, all zero on
    padded points, and real-point weights m [b, n] (1 real, 0 padded)."""
    x = clean_points(points, mask)
    m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None \
        else mask.to(x.dtype)
    rows = [x, x.square().sum(-1, keepdim=True), m.unsqueeze(-1)]
    return torch.cat(rows, dim=-1).transpose(1, 2).contiguous(), m


def _components(k: Tensor, k_max: int) -> Tensor:
    """Which components are real, [b, k] bool."""
    return torch.arange(k_max, device=k.device) < k.to(torch.long).unsqueeze(1)


def _restarts(xs: Tensor, m: Tensor, k: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ``r`` copies of the sets along dim 0 (restart-major: row = restart * b + set)."""
    return xs.repeat(r, 1, 1), m.repeat(r, 1), k.repeat(r)


def _best(score: Tensor, r: int, *tensors: Tensor) -> list[Tensor]:
    """Per set, the restart with the highest ``score`` [r * b]; selects rows of ``tensors``."""
    b = score.shape[0] // r
    best = score.view(r, b).argmax(0)  # first of equal scores
    rows = best * b + torch.arange(b, device=score.device)
    return [t[rows] for t in tensors]


# ---------------------------------------------------------------------------------------------
# identity and oracle.


@torch.no_grad()
def identity(points: Tensor, centres: Tensor, weights: Tensor,
             mask: Tensor | None = None) -> BaselineResult:
    """c(x) = x. Its assignments are the clusters it induces (nearest true centre)."""
    x = clean_points(points, mask)
    return _result(x, induced_clusters(x, centres, weights), mask)


@torch.no_grad()
def oracle_posterior_mean(points: Tensor, centres: Tensor, weights: Tensor, sigma: Tensor,
                          mask: Tensor | None = None) -> BaselineResult:
    """The oracle: the posterior mean c*(x) = sum_k r_k(x) mu_k with the true parameters,
    r_k(x) ∝ pi_k N(x; mu_k, sigma^2 I); assignment argmax_k r_k(x).

    Args:
        points [b, n, d]; centres [b, k, d]; weights [b, k] (0 = padded component);
        sigma [b] noise standard deviation; mask [b, n] or None.
    """
    x = clean_points(points, mask)
    logits = posterior_logits(x, centres, weights, sigma)
    resp = torch.softmax(logits, dim=-1)  # [b, n, k]
    return _result(resp @ centres.to(x.dtype), logits.argmax(-1), mask)


# ---------------------------------------------------------------------------------------------
# k-means++ seeding.


def _sample_index(weights: Tensor, u: Tensor) -> Tensor:
    """Indices [b, t] drawn with probability ∝ ``weights`` [b, n] (>= 0), from uniforms u [b, t].

    Inverse CDF: the first index whose cumulative weight exceeds u * total. Zero-weight entries
    own an empty interval and are never picked; a row of zeros (no real point) returns 0.
    """
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:]
    # u < 1 - 2^-50 keeps u * total strictly below total after rounding.
    t = u.clamp(max=1.0 - 2.0**-50) * total
    index = torch.searchsorted(cdf, t.contiguous(), right=True)
    return torch.where(total > 0, index, 0).clamp_(max=weights.shape[1] - 1)


def local_trials(k: Tensor) -> Tensor:
    """Candidates per greedy k-means++ step, 2 + floor(ln k) (scikit-learn's choice), [b]."""
    return 2 + torch.log(k.to(torch.float64)).floor().long()


@torch.no_grad()
def kmeans_plus_plus_init(points: Tensor, k: Tensor, mask: Tensor | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Greedy k-means++ seeds [b, k_max, d] (k_max = max k), as scikit-learn seeds k-means
    and GaussianMixture: the first seed uniform over a set's real points; for each next one,
    :func:`local_trials` candidates drawn with probability ∝ squared distance to the nearest
    seed so far, keeping the candidate that leaves the smallest sum of those distances.

    Seeds ``>= k`` of a set are drawn too (it keeps the loop batched) and are to be ignored.
    When every real point already coincides with a seed (fewer distinct points than K), the
    candidates are uniform over the real points: a duplicate seed, which the fits handle.
    """
    return _kmeans_plus_plus(*_inputs(points, mask), k, generator)


def _kmeans_plus_plus(xs: Tensor, m: Tensor, k: Tensor,
                      generator: torch.Generator | None) -> Tensor:
    b, d = xs.shape[0], xs.shape[1] - 2
    xt = xs[:, :d]  # [b, d, n]
    k_max = int(k.max())
    trials = local_trials(k).unsqueeze(1)  # [b, 1]
    t_max = int(trials.max())
    u = torch.rand((b, k_max, t_max), generator=generator, device=xt.device, dtype=xt.dtype)
    seeds = xt.new_empty(b, k_max, d)
    nearest = torch.full_like(m, math.inf)  # squared distance to the nearest seed, [b, n]
    weights = m
    for j in range(k_max):
        # The first seed is one uniform draw; later ones the best of the local trials.
        draws = u[:, j, :1] if j == 0 else u[:, j]
        index = _sample_index(weights, draws)  # [b, t]
        candidates = xt.gather(2, index.unsqueeze(1).expand(b, d, -1))  # [b, d, t]
        dist = _distances_kn(xs, candidates.transpose(1, 2))  # [b, t, n]
        # (Full-size operand first: torch lays the output out after it, ~4x faster here.)
        closer = torch.minimum(dist, nearest.unsqueeze(1))
        potential = (closer * m.unsqueeze(1)).sum(-1)  # [b, t]
        unused = torch.arange(index.shape[1], device=xt.device) >= trials
        best = potential.masked_fill(unused, math.inf).argmin(1)  # [b]
        rows = torch.arange(b, device=xt.device)
        seeds[:, j] = candidates[rows, :, best]
        nearest = closer[rows, best]
        weights = nearest * m
        # All real points already on seeds: draw the next candidates uniformly instead.
        weights = torch.addcmul(weights, m, (weights.sum(-1, keepdim=True) == 0).to(m.dtype))
    return seeds


def _seeded_inputs(points: Tensor, mask: Tensor | None, k: Tensor, n_init: int,
                   generator: torch.Generator | None, seeds: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Augmented points, mask and k with ``n_init`` restarts as extra rows, their k-means++
    seeds (or the given ``seeds``, one restart), and the restart count."""
    xs, m = _inputs(points, mask)
    if seeds is not None:
        return xs, m, k, seeds, 1
    xs, m, k = _restarts(xs, m, k, n_init)
    return xs, m, k, _kmeans_plus_plus(xs, m, k, generator), n_init


# ---------------------------------------------------------------------------------------------
# EM for a spherical GMM.


@dataclass
class _GMM:
    log_weights: Tensor  # [b, k], -inf for switched-off components
    means: Tensor  # [b, k, d]; placeholders (their seeds) for switched-off components
    variances: Tensor  # [b, k]; placeholders (the set's variance) for switched-off components

    def rows(self, index: Tensor) -> "_GMM":
        """The sets ``index`` (long or bool [b])."""
        return _GMM(self.log_weights[index], self.means[index], self.variances[index])

    def put(self, index: Tensor, part: "_GMM") -> None:
        """Overwrite sets ``index`` (long) with ``part``, in place."""
        self.log_weights[index] = part.log_weights
        self.means[index] = part.means
        self.variances[index] = part.variances


def _distances_kn(xs: Tensor, c: Tensor, comp: Tensor | None = None) -> Tensor:
    """||x_i - c_j||^2, [b, k, n], for augmented points xs [b, d + 2, n] and centres
    [b, k, d]: |x|^2 - 2 c.x + |c|^2 as one matmul (0 on padded points). Switched-off
    components (``comp`` [b, k] False) get a huge finite distance (an infinite one would make
    NaN on the zero columns of padded points)."""
    c2 = c.square().sum(-1, keepdim=True)  # [b, k, 1]
    if comp is not None:
        c2 = c2.masked_fill(~comp.unsqueeze(-1), torch.finfo(c.dtype).max / 4)
    coefficients = torch.cat([-2 * c, torch.ones_like(c2), c2], dim=-1)  # [b, k, d + 2]
    return (coefficients @ xs).clamp_min_(0.0)


def _set_variance(xs: Tensor, m: Tensor) -> Tensor:
    """Per-coordinate variance of each set's real points [b]; 1 where it is 0 (one distinct
    point), so that the relative regulariser stays positive."""
    d = xs.shape[1] - 2
    sums = xs.sum(-1)  # [b, d + 2]: sum x, sum |x|^2, count (padded columns are 0)
    count = sums[:, d + 1].clamp_min(1.0)
    mean_sq = sums[:, :d].square().sum(-1) / count.square()
    var = ((sums[:, d] / count - mean_sq) / d).clamp_min(0.0)
    return torch.where(var > 0, var, 1.0)


def _m_step(xs: Tensor, resp: Tensor, comp: Tensor, reg: Tensor, old: _GMM,
            tied: bool = False) -> _GMM:
    """Maximum-likelihood spherical GMM for responsibilities ``resp`` [b, k, n] of the
    augmented points ``xs``; with ``tied``, one variance shared by the set's components."""
    d = xs.shape[1] - 2
    stats = resp @ xs.transpose(1, 2)  # [b, k, d + 2]: sum r x, sum r |x|^2, sum r
    # scikit-learn adds 10 machine epsilons to every component's mass; matching it keeps the
    # fits comparable and every real component's log-weight finite.
    nk = stats[..., d + 1] + 10 * torch.finfo(xs.dtype).eps  # [b, k]
    means = stats[..., :d] / nk.unsqueeze(-1)
    # E_r|x - mu|^2 = E_r|x|^2 - |mu|^2 (scikit-learn's form); clamped against cancellation.
    spread = (stats[..., d] / nk - means.square().sum(-1)).clamp_min_(0.0)
    keep = (nk < _EMPTY) | ~comp  # empty or switched off: keep the old values
    if tied:  # the pooled spread: sum_k n_k spread_k / sum_k n_k over the real components
        mass = torch.where(comp, nk, 0.0)
        pooled = (mass * spread).sum(1) / mass.sum(1)
        variances = (pooled / d + reg).unsqueeze(1).expand_as(spread).clone()
    else:
        variances = torch.where(keep, old.variances, spread.div_(d).add_(reg.unsqueeze(1)))
    means = torch.where(keep.unsqueeze(-1), old.means, means)
    w = torch.where(comp, nk, 0.0)
    return _GMM(torch.log(w / w.sum(1, keepdim=True)), means, variances)  # log 0 = -inf


def _e_step(xs: Tensor, m: Tensor, count: Tensor, gmm: _GMM) -> tuple[Tensor, Tensor]:
    """Mean log-likelihood per real point [b] (``count`` real points per set) and
    responsibilities [b, k, n]."""
    # log pi_k N(x; mu_k, v_k I) = 2 h_k mu_k.x - h_k |x|^2 + c_k with h_k = 1 / (2 v_k),
    # c_k = log pi_k - d/2 log(2 pi v_k) - h_k |mu_k|^2: a single matmul with [x; |x|^2; 1].
    # (Padded points, all-zero columns of xs, get log_prob 0: finite, and masked below.)
    d = xs.shape[1] - 2
    h = 0.5 / gmm.variances  # [b, k]
    c = gmm.log_weights - 0.5 * d * torch.log(2 * math.pi * gmm.variances)
    c = c.sub_(h * gmm.means.square().sum(-1))
    # Switched-off components get a huge finite constant rather than -inf: a padded point's
    # zero column would turn -inf * 0 into NaN; exp() still gives them exactly 0.
    c = c.clamp_min_(torch.finfo(c.dtype).min / 4)
    coefficients = torch.cat([gmm.means * (2 * h).unsqueeze(-1), -h.unsqueeze(-1),
                              c.unsqueeze(-1)], dim=-1)  # [b, k, d + 2]
    log_prob = coefficients @ xs  # [b, k, n]
    top = log_prob.amax(1, keepdim=True)  # [b, 1, n], finite: every set has a real component
    # One exp serves both the likelihood and the softmax. The clamp costs less than it saves:
    # exp of an argument that underflows takes a slow path on CPU (2x slower), and a term below
    # e^-700 ~ 1e-304 of the largest one changes nothing.
    e = log_prob.sub_(top).clamp_min_(-700.0).exp_()
    total = e.sum(1, keepdim=True)
    log_norm = torch.log(total).add_(top).squeeze(1)  # [b, n]
    return (log_norm * m).sum(1) / count, e.div_(total)


def _argmin_k(values: Tensor) -> tuple[Tensor, Tensor]:
    """First index of the minimum over dim 1 of [b, k, n], [b, n] long, and the minimum.

    A loop over the small k: on CPU torch's index-returning reductions over a middle dim of
    this shape are 10-100x slower than ``amin`` plus k comparisons.
    """
    best = values.amin(1)
    index = torch.zeros_like(best, dtype=torch.long)
    for j in range(values.shape[1] - 1, 0, -1):
        index.masked_fill_(values[:, j] == best, j)
    index.masked_fill_(values[:, 0] == best, 0)
    return index, best


def _nearest(xs: Tensor, c: Tensor, comp: Tensor) -> tuple[Tensor, Tensor]:
    """Each point's nearest real centre [b, n] long and its squared distance [b, n]."""
    return _argmin_k(_distances_kn(xs, c, comp))


def _one_hot_kn(index: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """One-hot [b, k, n] of ``index`` [b, n] (padded points need no masking: their columns of
    xs are zero)."""
    return (torch.arange(k, device=index.device).view(1, k, 1) == index.unsqueeze(1)).to(dtype)


def _initial_gmm(xs: Tensor, m: Tensor, k: Tensor, seeds: Tensor, reg_covar: float,
                 tied: bool = False) -> tuple[_GMM, Tensor, Tensor]:
    """(initial GMM, real components [b, k], absolute regulariser [b])."""
    seeds = seeds.to(xs.dtype)
    comp = _components(k, seeds.shape[1])
    set_var = _set_variance(xs, m)
    reg = reg_covar * set_var
    placeholder = _GMM(torch.zeros_like(seeds[..., 0]), seeds,
                       set_var.unsqueeze(1).expand(-1, seeds.shape[1]))
    resp = _one_hot_kn(_nearest(xs, seeds, comp)[0], seeds.shape[1], xs.dtype)
    return _m_step(xs, resp, comp, reg, placeholder, tied), comp, reg


@torch.no_grad()
def initial_em_parameters(points: Tensor, k: Tensor, mask: Tensor | None, seeds: Tensor,
                          reg_covar: float = EM_REG_COVAR) -> tuple[Tensor, Tensor, Tensor]:
    """EM's starting point from seeds [b, k, d]: one M-step on the hard nearest-seed
    assignment. Returns (weights [b, k], means [b, k, d], variances [b, k]).

    A seed that gets no point (a duplicate) keeps its position and the set's variance.
    """
    gmm = _initial_gmm(*_inputs(points, mask), k, seeds, reg_covar)[0]
    return gmm.log_weights.exp(), gmm.means, gmm.variances


@torch.no_grad()
def fit_em(points: Tensor, k: Tensor, mask: Tensor | None = None, *, n_init: int = 1,
           max_iter: int = 100, tol: float = 1e-6, generator: torch.Generator | None = None,
           seeds: Tensor | None = None, reg_covar: float = EM_REG_COVAR,
           tied: bool = False) -> EMFit:
    """Fit a spherical GMM with ``k`` [b] components to every set by EM.

    Each restart seeds with k-means++ (:func:`kmeans_plus_plus_init`), starts from
    :func:`initial_em_parameters`, then alternates E and M steps like scikit-learn's
    ``GaussianMixture(covariance_type="spherical")``: a set stops after the M-step of the first
    iteration whose mean log-likelihood changed by less than ``tol``, or after ``max_iter``
    iterations. Every variance carries ``reg_covar`` times the set's per-coordinate variance
    (the floor against a component collapsing onto one point); a component that loses all its
    points keeps its mean and variance. The restart with the highest final log-likelihood wins.

    Args:
        points [b, n, d]; k [b] long, components per set; mask [b, n] bool or None.
        n_init: restarts, run together as extra rows of the batch.
        seeds: fixed seeds [b, k_max, d] instead of k-means++ (then one restart).
        tied: one variance shared by each set's components (the generator's model class).
    """
    xs, m, k, seeds, r = _seeded_inputs(points, mask, k, n_init, generator, seeds)
    gmm, comp, reg = _initial_gmm(xs, m, k, seeds, reg_covar, tied)
    rows = torch.arange(xs.shape[0], device=xs.device)
    n_iter = torch.full_like(rows, max_iter)
    converged = torch.zeros_like(rows, dtype=torch.bool)
    # The loop works on the sets still running only: most converge in a few dozen iterations
    # and a handful would otherwise keep the whole batch busy until max_iter.
    fitted = _GMM(gmm.log_weights.clone(), gmm.means.clone(), gmm.variances.clone())
    count = m.sum(1).clamp_min(1.0)
    xs_run, m_run, count_run, comp_run, reg_run = xs, m, count, comp, reg
    previous = torch.full_like(reg, -math.inf)
    for iteration in range(1, max_iter + 1):
        mean_ll, resp = _e_step(xs_run, m_run, count_run, gmm)
        gmm = _m_step(xs_run, resp, comp_run, reg_run, gmm, tied)
        done = (mean_ll - previous).abs() < tol
        previous = mean_ll
        if bool(done.any()):  # a host sync per iteration, the price of stopping early
            stopped = rows[done]
            fitted.put(stopped, gmm.rows(done))
            n_iter[stopped] = iteration
            converged[stopped] = True
            keep = ~done
            rows, gmm, previous = rows[keep], gmm.rows(keep), previous[keep]
            xs_run, m_run, count_run = xs_run[keep], m_run[keep], count_run[keep]
            comp_run, reg_run = comp_run[keep], reg_run[keep]
            if rows.numel() == 0:
                break
    fitted.put(rows, gmm)  # sets that hit max_iter
    mean_ll, resp = _e_step(xs, m, count, fitted)
    resp = resp.transpose(1, 2) * m.unsqueeze(-1)  # [b, n, k]
    means, log_w, var, mean_ll, resp, n_iter, converged = _best(
        mean_ll, r, fitted.means, fitted.log_weights, fitted.variances, mean_ll, resp, n_iter,
        converged)
    return EMFit(means=means, weights=log_w.exp(), variances=var, log_likelihood=mean_ll,
                 responsibilities=resp, n_iter=n_iter, converged=converged)


# ---------------------------------------------------------------------------------------------
# k-means.


@torch.no_grad()
def fit_kmeans(points: Tensor, k: Tensor, mask: Tensor | None = None, *, n_init: int = 1,
               max_iter: int = 100, generator: torch.Generator | None = None,
               seeds: Tensor | None = None) -> KMeansFit:
    """Lloyd's k-means with ``k`` [b] clusters per set, greedy k-means++ seeds
    (:func:`kmeans_plus_plus_init`) and ``n_init`` restarts (lowest inertia wins). Iterates
    until no real point changes cluster in any set, or ``max_iter`` updates; an empty cluster
    keeps its centroid.

    Args:
        points [b, n, d]; k [b] long; mask [b, n] bool or None.
        seeds: fixed seeds [b, k_max, d] instead of k-means++ (then one restart).
    """
    xs, m, k, seeds, r = _seeded_inputs(points, mask, k, n_init, generator, seeds)
    d = xs.shape[1] - 2
    centroids = seeds.to(xs.dtype)
    k_max = centroids.shape[1]
    comp = _components(k, k_max)
    real = m > 0
    n_iter = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)
    moving = torch.ones_like(real[:, 0])  # sets whose assignments still change
    index, best = _nearest(xs, centroids, comp)
    for _ in range(max_iter):
        stats = _one_hot_kn(index, k_max, xs.dtype) @ xs.transpose(1, 2)  # [b, k, d + 2]
        counts = stats[..., d + 1:]  # real points per cluster, [b, k, 1]
        centroids = torch.where(counts > 0, stats[..., :d] / counts.clamp_min(1.0), centroids)
        n_iter += moving
        new_index, best = _nearest(xs, centroids, comp)
        moving &= ((new_index != index) & real).any(1)
        index = new_index
        if not bool(moving.any()):  # converged: the centroids are a fixed point
            break
    inertia = (best * m).sum(1)
    index = index.masked_fill(~real, 0)
    centroids, index, inertia, n_iter = _best(-inertia, r, centroids, index, inertia, n_iter)
    return KMeansFit(centroids=centroids, assignments=index, inertia=inertia, n_iter=n_iter)


# ---------------------------------------------------------------------------------------------
# K by BIC.


def bic_parameters(k: int, d: int) -> int:
    """Free parameters of a tied spherical GMM: k means, k - 1 weights, one variance."""
    return k * d + (k - 1) + 1


@torch.no_grad()
def fit_em_bic(points: Tensor, k_max: int, mask: Tensor | None = None, *, n_init: int = 1,
               max_iter: int = 100, tol: float = 1e-6,
               generator: torch.Generator | None = None) -> BaselineResult:
    """Tied spherical EM for every K = 1..``k_max``; per set, the fit with the lowest BIC,
    -2 log L + p log n (p = :func:`bic_parameters`). Returns its posterior-mean centres,
    assignments and K (``k_hat``)."""
    b, n = points.shape[:2]
    count = torch.full((b,), n, device=points.device) if mask is None else mask.sum(1)
    log_n = count.double().clamp_min(1).log()
    best_bic = torch.full((b,), math.inf, dtype=torch.float64, device=points.device)
    best: BaselineResult | None = None
    k_hat = torch.ones(b, dtype=torch.long, device=points.device)
    for k in range(1, k_max + 1):
        fit = fit_em(points, torch.full((b,), k, device=points.device), mask, n_init=n_init,
                     max_iter=max_iter, tol=tol, generator=generator, tied=True)
        bic = -2 * fit.log_likelihood.double() * count + bic_parameters(k, points.shape[-1]) \
            * log_n
        result = fit.result(mask)
        if best is None:
            best, best_bic = result, bic
            continue
        better = bic < best_bic
        best = BaselineResult(torch.where(better.view(-1, 1, 1), result.centres, best.centres),
                              torch.where(better.view(-1, 1), result.assignments,
                                          best.assignments))
        best_bic = torch.where(better, bic, best_bic)
        k_hat = torch.where(better, k, k_hat)
    assert best is not None
    best.k_hat = k_hat
    return best


# ---------------------------------------------------------------------------------------------
# Dispatch.


def run_baseline(name: str, batch: GMMBatch, em: EMConfig, generator: torch.Generator,
                 bayes: BayesConfig | None = None) -> BaselineResult:
    """The answer of baseline ``name`` (one of :data:`BASELINES`) for every point of ``batch``.

    ``em`` gives n_init (em, kmeans), tied_n_init (em_tied, em_bic), max_iter and tol;
    ``generator`` (on the batch's device) seeds k-means++ and the Gibbs sampler; ``bayes``
    configures the sampler (default: :class:`BayesConfig`'s defaults). ``em_bic`` tries
    K = 1..K_max, K_max the batch's largest possible K (its padded component count).
    """
    if name == "identity":
        return identity(batch.points, batch.centres, batch.weights, batch.mask)
    if name == "oracle":
        return oracle_posterior_mean(batch.points, batch.centres, batch.weights, batch.sigma,
                                     batch.mask)
    if name == "em":
        return fit_em(batch.points, batch.k, batch.mask, n_init=em.n_init,
                      max_iter=em.max_iter, tol=em.tol, generator=generator).result(batch.mask)
    if name == "em_tied":
        return fit_em(batch.points, batch.k, batch.mask, n_init=em.tied_n_init,
                      max_iter=em.max_iter, tol=em.tol, generator=generator,
                      tied=True).result(batch.mask)
    if name == "em_bic":
        return fit_em_bic(batch.points, batch.centres.shape[1], batch.mask,
                          n_init=em.tied_n_init, max_iter=em.max_iter, tol=em.tol,
                          generator=generator)
    if name == "kmeans":
        return fit_kmeans(batch.points, batch.k, batch.mask, n_init=em.n_init,
                          max_iter=em.max_iter, generator=generator).result(batch.mask)
    if name == "bayes":
        from gmmt.evaluation.bayes import bayes_posterior_mean  # it imports this module

        if batch.centre_scale is None or batch.weight_concentration is None:
            raise ValueError("the bayes baseline needs the batch's prior (centre_scale, "
                             "weight_concentration), which sample_gmm_batch fills in")
        config = bayes or BayesConfig()
        fit = bayes_posterior_mean(
            batch.points, batch.k, batch.sigma, batch.centre_scale, batch.weight_concentration,
            batch.mask, num_chains=config.num_chains, burn_in=config.burn_in,
            num_samples=config.num_samples, tolerance=config.tolerance, generator=generator)
        return BaselineResult(fit.centres, fit.assignments, unconverged=fit.unconverged)
    if name == "bayes_unknown_k":
        from gmmt.evaluation.bayes_unknown_k import bayes_unknown_k

        if batch.k_prior is None or batch.centre_scale is None:
            raise ValueError("the bayes_unknown_k baseline needs the batch's prior (k_prior, "
                             "centre_scale, weight_concentration), which sample_gmm_batch "
                             "fills in")
        config = bayes or BayesConfig()
        fit = bayes_unknown_k(
            batch.points, batch.k_prior, batch.sigma, batch.centre_scale,
            batch.weight_concentration, batch.mask, num_chains=config.num_chains,
            burn_in=config.burn_in, num_samples=config.num_samples, generator=generator)
        return BaselineResult(fit.centres, fit.assignments, k_hat=fit.k_hat,
                              unconverged=fit.unconverged)
    raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
