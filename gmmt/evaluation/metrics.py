"""Per-set metrics of predicted centres and of clusterings, in float64, mask-aware, no grad.

Every function is batched over sets (no Python loop over sets) and returns one value per set,
[b]; callers sum them (see :mod:`gmmt.evaluation.validate`). Padded points (``mask`` False) and
padded components (zero weight) never contribute; values at padded positions may be junk.

Metrics (formulas in docs/design.md):

* centre MSE per coordinate to each point's own centre, and MSE / sigma^2;
* ``gap_closed`` = (MSE_em - MSE_model) / (MSE_em - MSE_oracle), from averaged MSEs;
* ARI and NMI of a clustering against the true labels. A model outputs centres, not clusters:
  its *induced clustering* (:func:`induced_clusters`) assigns every prediction to the nearest
  true centre, so ARI/NMI measure whether predictions land on the right centre. Baselines are
  scored with their own assignments;
* energy distance and entropic Wasserstein cost (what Sinkhorn computes) between the predicted
  cloud and the true centres weighted by the mixture weights pi. Both compare with pi, not with
  a set's own label proportions, so even the oracle scores well above 0: the proportions of a
  few hundred points differ from pi by a few per cent, and that mass must travel between
  clusters (at high SNR the oracle's Wasserstein cost is many times its MSE). Read them as
  distribution-level scores, not as denoising errors;
* helpers for the per-SNR-bin and per-K breakdowns.

Shape legend: ``b`` sets, ``n`` points, ``d`` dims, ``k`` components (padded to K_max).
"""

import math
from itertools import pairwise

import torch
from torch import Tensor

from gmmt.config.data import DistributionSpec
from gmmt.data.batch import squared_distances

# Entropic regularisation of the Wasserstein metric in units of each set's sigma^2, the L1
# error of the centre marginal it stops at, and its cap on Newton steps. On validation sets
# epsilon = 0.01 sigma^2 is within ~0.02 % of an exact LP for the oracle, EM, k-means and
# identity predictions and converges in 40-80 steps.
WASSERSTEIN_EPSILON = 0.01
WASSERSTEIN_TOL = 1e-9
WASSERSTEIN_MAX_ITERATIONS = 500
# Elements of one [chunk, m, m] distance matrix in the energy distance (128 MiB of float64).
_ENERGY_CHUNK_ELEMENTS = 2**24


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 everywhere except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _real(mask: Tensor | None, like: Tensor) -> Tensor:
    """The real-point mask [b, n] bool (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask


def clean_points(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` [b, n, d] in the work dtype with padded points zeroed (junk there, even NaN,
    cannot leak through a 0 * NaN product)."""
    x = x.to(work_dtype(x.device))
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


# ---------------------------------------------------------------------------------------------
# Centre errors.


@torch.no_grad()
def centre_mse_per_set(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per coordinate over each set's real points, [b] float64."""
    dtype = work_dtype(pred.device)
    err = (pred.to(dtype) - target.to(dtype)).square().sum(-1) / pred.shape[-1]  # [b, n]
    if mask is None:
        return err.mean(-1)
    m = mask.to(dtype)
    # where, not a product: a NaN at a padded position must not reach the sum.
    return torch.where(mask, err, 0.0).sum(-1) / m.sum(-1).clamp_min(1.0)


def gap_closed(mse_model: float | Tensor, mse_em: float | Tensor,
               mse_oracle: float | Tensor) -> float | Tensor:
    """Fraction of EM's excess error over the oracle that the model removes:
    (em - model) / (em - oracle). 1 = as good as the oracle (which knows the true
    parameters: no estimator that sees only the points reaches 1), 0 = as good as EM, < 0
    worse than EM.
    NaN where EM already equals the oracle (nothing to close)."""
    denominator = mse_em - mse_oracle
    if isinstance(denominator, Tensor):
        return (mse_em - mse_model) / torch.where(denominator == 0, math.nan, denominator)
    return math.nan if denominator == 0 else (mse_em - mse_model) / denominator


# ---------------------------------------------------------------------------------------------
# Clusterings.


@torch.no_grad()
def induced_clusters(pred: Tensor, centres: Tensor, weights: Tensor) -> Tensor:
    """The clustering a denoiser induces: each prediction's nearest real true centre, [b, n] long.

    Args:
        pred: predicted centres [b, n, d]; centres: true centres [b, k, d];
        weights: [b, k], zero for padded components (never chosen).
    """
    dtype = work_dtype(pred.device)
    sq = squared_distances(pred.to(dtype), centres.to(dtype))
    return sq.masked_fill((weights == 0).unsqueeze(1), math.inf).argmin(-1)


def contingency_tables(labels_a: Tensor, labels_b: Tensor, num_a: int, num_b: int,
                       mask: Tensor | None = None) -> Tensor:
    """Counts n_ij of real points with label i in ``labels_a`` and j in ``labels_b``,
    [b, num_a, num_b] in the work dtype (labels [b, n] long in [0, num_a) / [0, num_b))."""
    b = labels_a.shape[0]
    dtype = work_dtype(labels_a.device)
    real = _real(mask, labels_a.unsqueeze(-1))
    index = torch.where(real, labels_a * num_b + labels_b, 0)  # [b, n]; padding -> cell 0 ...
    ones = real.to(dtype)  # ... with count 0
    table = torch.zeros(b, num_a * num_b, dtype=dtype, device=labels_a.device)
    table.scatter_add_(1, index, ones)
    return table.view(b, num_a, num_b)


def _num_labels(labels_a: Tensor, labels_b: Tensor, mask: Tensor | None) -> int:
    """One more than the largest label on a real point (padded labels may be junk)."""
    if labels_a.numel() == 0:
        return 1
    real = _real(mask, labels_a.unsqueeze(-1))
    return int(torch.where(real, torch.maximum(labels_a, labels_b), 0).max()) + 1


@torch.no_grad()
def adjusted_rand_index(labels_true: Tensor, labels_pred: Tensor,
                        mask: Tensor | None = None) -> Tensor:
    """Adjusted Rand index per set, [b]; equals scikit-learn's ``adjusted_rand_score`` on each
    set's real points (including its convention 1.0 when both are the same trivial partition).

    From the pair-confusion counts of the contingency table (integers, exact in float64 while
    n^2 < 2^53 / n, i.e. n up to ~200 000 points).
    """
    num = _num_labels(labels_true, labels_pred, mask)
    table = contingency_tables(labels_true, labels_pred, num, num, mask)
    n = table.sum((1, 2))
    sum_squares = table.square().sum((1, 2))
    rows2 = table.sum(2).square().sum(1)  # sum_i a_i^2 (true cluster sizes)
    cols2 = table.sum(1).square().sum(1)  # sum_j b_j^2 (predicted cluster sizes)
    tp = sum_squares - n
    fp = cols2 - sum_squares
    fn = rows2 - sum_squares
    tn = n.square() - fp - fn - sum_squares
    numerator = 2.0 * (tp * tn - fn * fp)
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fn == 0) & (fp == 0)
    return torch.where(perfect, 1.0, numerator / torch.where(perfect, 1.0, denominator))


def _entropy(counts: Tensor, n: Tensor) -> Tensor:
    """Shannon entropy (nats) of cluster sizes [b, c] summing to n [b]."""
    p = counts / n.clamp_min(1.0).unsqueeze(-1)
    return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)


@torch.no_grad()
def normalized_mutual_info(labels_true: Tensor, labels_pred: Tensor,
                           mask: Tensor | None = None) -> Tensor:
    """Normalised mutual information per set with arithmetic-mean normalisation, [b]; equals
    scikit-learn's ``normalized_mutual_info_score`` (default ``average_method``) on each set's
    real points, including its conventions: 1.0 when both labelings are a single cluster,
    0.0 when the mutual information is 0."""
    num = _num_labels(labels_true, labels_pred, mask)
    table = contingency_tables(labels_true, labels_pred, num, num, mask)
    n = table.sum((1, 2))
    rows, cols = table.sum(2), table.sum(1)  # [b, num]
    # MI = sum_ij n_ij/N log(N n_ij / (a_i b_j)), over nonzero cells.
    outer = rows.unsqueeze(2) * cols.unsqueeze(1)
    nz = table > 0
    safe = torch.where(nz, table, 1.0)
    terms = safe * (torch.log(safe) + torch.log(n.clamp_min(1.0))[:, None, None]
                    - torch.log(torch.where(nz, outer, 1.0)))
    mi = (torch.where(nz, terms, 0.0).sum((1, 2)) / n.clamp_min(1.0)).clamp_min(0.0)
    h_true, h_pred = _entropy(rows, n), _entropy(cols, n)
    normaliser = ((h_true + h_pred) / 2).clamp_min(torch.finfo(mi.dtype).eps)
    single = ((rows > 0).sum(1) == 1) & ((cols > 0).sum(1) == 1)
    return torch.where(single, 1.0, torch.where(mi == 0, 0.0, mi / normaliser))


# ---------------------------------------------------------------------------------------------
# Distances between the predicted cloud and the weighted true centres.


def _cloud_and_centres(pred: Tensor, centres: Tensor, weights: Tensor, mask: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cleaned points [b, n, d] with uniform weights over real points [b, n], and centres
    [b, k, d] with weights normalised to 1 [b, k] (padded centres zeroed), in the work dtype."""
    x = clean_points(pred, mask)
    a = _real(mask, x).to(x.dtype)
    a = a / a.sum(1, keepdim=True).clamp_min(1.0)
    w = weights.to(x.dtype)
    w = w / w.sum(1, keepdim=True)
    c = centres.to(x.dtype).masked_fill((w == 0).unsqueeze(-1), 0.0)
    return x, a, c, w


@torch.no_grad()
def energy_distance(pred: Tensor, centres: Tensor, weights: Tensor,
                    mask: Tensor | None = None) -> Tensor:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'|, [b] (Euclidean, units of length),
    X uniform over a set's real predictions, Y = centre k with probability ``weights[k]``.

    The X - X' term is O(n^2) per set, so sets are processed in chunks that keep each
    [chunk, n + k, n + k] distance matrix near 128 MiB.
    """
    x, a, c, w = _cloud_and_centres(pred, centres, weights, mask)
    # One signed cloud z = (x, c) with weights s = (a, -w): s^T D s = -energy distance.
    z = torch.cat([x, c], 1)  # [b, m, d]
    s = torch.cat([a, -w], 1)  # [b, m]
    m = z.shape[1]
    chunk = max(1, _ENERGY_CHUNK_ELEMENTS // (m * m))
    out = []
    for start in range(0, z.shape[0], chunk):
        zc, sc = z[start:start + chunk], s[start:start + chunk]
        # Direct differences: exact at the near-coincident points of a good prediction.
        dist = torch.cdist(zc, zc, compute_mode="donot_use_mm_for_euclid_dist")
        out.append(-(sc.unsqueeze(1) @ dist @ sc.unsqueeze(2)).reshape(-1))
    return torch.cat(out).clamp_min(0.0)  # >= 0 in exact arithmetic


def _semi_dual(g: Tensor, cost: Tensor, eps: Tensor, a: Tensor, w: Tensor, log_w: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Entropic OT semi-dual F(g) [b] at centre potentials g [b, k] (the point potentials
    eliminated in closed form), with its plan [b, k, n] (column i sums to a_i) and the
    per-point softmax over centres [b, k, n]."""
    logits = (g.unsqueeze(-1) - cost) / eps + log_w.unsqueeze(-1)  # [b, k, n]
    lse = torch.logsumexp(logits, dim=1)  # [b, n]
    soft = torch.exp(logits - lse.unsqueeze(1))
    value = torch.where(w > 0, w * g, 0.0).sum(1) - eps.view(-1) * (a * lse).sum(1)
    return value, soft * a.unsqueeze(1), soft


@torch.no_grad()
def entropic_wasserstein(pred: Tensor, centres: Tensor, weights: Tensor, sigma: Tensor,
                         mask: Tensor | None = None, epsilon: float = WASSERSTEIN_EPSILON,
                         tol: float = WASSERSTEIN_TOL,
                         max_iterations: int = WASSERSTEIN_MAX_ITERATIONS) -> Tensor:
    """Entropic optimal-transport cost <P, C> between the predicted cloud and the weighted
    centres, [b]: the quantity Sinkhorn computes, with C_ik = ||x_i - mu_k||^2 / d (the units
    of the centre MSE) and regularisation ``epsilon * sigma^2`` per set. Not debiased; at the
    default epsilon within ~0.02 % of the exact squared 2-Wasserstein distance per coordinate
    (checked against a linear-programming solver).

    Solved by damped Newton steps on the semi-dual (one potential per centre: k unknowns per
    set, a k x k system), with epsilon halved per set from its largest cost down to the
    target whenever the centre marginal is within 1e-3 (L1) of the weights; stops once every
    set is at the target within ``tol``, or after ``max_iterations`` Newton steps. Sinkhorn
    iterations are not used because they stall exactly where this metric matters: when
    predicted mass must move between far apart clusters (a predicted clump heavier than its
    centre), they need O(cost / epsilon) iterations and a fixed budget returns a plan that
    ignores the centre weights.
    """
    x, a, c, w = _cloud_and_centres(pred, centres, weights, mask)
    cost = squared_distances(x, c).transpose(1, 2).contiguous() / x.shape[-1]  # [b, k, n]
    target = (epsilon * sigma.to(x.dtype).square()).view(-1, 1, 1)
    scale = cost.amax((1, 2), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    eps = torch.maximum(scale, target)
    valid = w > 0
    log_w = torch.where(valid, w, 1.0).log().masked_fill(~valid, -math.inf)
    eye = torch.eye(w.shape[1], dtype=x.dtype, device=x.device)
    g = torch.zeros_like(w)
    step_size = torch.ones_like(g[:, 0])
    value, plan, soft = _semi_dual(g, cost, eps, a, w, log_w)
    for _ in range(max_iterations):
        error = (w - plan.sum(2)).abs().sum(1).view(-1, 1, 1)
        final = eps == target
        if bool((final & (error < tol)).all()):
            break
        down = ~final & (error < 1e-3)
        if bool(down.any()):
            eps = torch.where(down, torch.maximum(eps / 2, target), eps)
            value, plan, soft = _semi_dual(g, cost, eps, a, w, log_w)
        # Newton: (-Hessian) step = gradient, -H = (diag(mass) - P S^T) / eps. The gradient
        # sums to 0 (F ignores a shift of g): a tiny ridge fixes the shift, and padded centres
        # get an identity row (their step is 0).
        mass = plan.sum(2)
        hessian = (torch.diag_embed(mass) - plan @ soft.transpose(1, 2)) / eps
        ridge = 1e-10 * hessian.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)
        hessian = hessian + eye * (ridge.view(-1, 1, 1) + (~valid).unsqueeze(-1).to(x.dtype))
        step = torch.linalg.solve(hessian, (w - mass).unsqueeze(-1)).squeeze(-1)
        # Shifts beyond the cost range only overshoot: cap the step there.
        longest = step.abs().amax(1).clamp_min(torch.finfo(x.dtype).tiny)
        step = step * (scale.view(-1) / longest).clamp(max=1.0).unsqueeze(-1)
        # Backtracking from twice the last accepted step size, per set, until F does not
        # decrease (beyond round-off).
        step_size = (2 * step_size).clamp(max=1.0)
        for _ in range(60):
            trial = _semi_dual(g + step_size.unsqueeze(-1) * step, cost, eps, a, w, log_w)[0]
            worse = trial < value - 1e-12 * (value.abs() + scale.view(-1))
            if not bool(worse.any()):
                break
            step_size = torch.where(worse, step_size / 2, step_size)
        g = g + step_size.unsqueeze(-1) * step
        value, plan, soft = _semi_dual(g, cost, eps, a, w, log_w)
    return (plan * cost).sum((1, 2))


# ---------------------------------------------------------------------------------------------
# Breakdowns by SNR, by K and by the separation of the closest centres.


def _support(spec: DistributionSpec) -> tuple[float, float]:
    """The spec's support, or mean +- 3 std for an unbounded one (only ``normal`` is)."""
    lo, hi = spec.support()
    if math.isinf(lo) or math.isinf(hi):
        lo = lo if not math.isinf(lo) else spec.mean - 3 * spec.std
        hi = hi if not math.isinf(hi) else spec.mean + 3 * spec.std
    return float(lo), float(hi)


def _label(x: float) -> str:
    return f"{x:.4g}"


def snr_bins(spec: DistributionSpec, bins: int) -> list[tuple[float, float]]:
    """Equal-width SNR bins (lo, hi) over the prior's support (one bin for a fixed SNR;
    mean +- 3 std for an unbounded normal, outer bins then catch the tails)."""
    lo, hi = _support(spec)
    if hi <= lo:
        return [(lo, hi)]
    width = (hi - lo) / bins
    return [(lo + i * width, hi if i == bins - 1 else lo + (i + 1) * width)
            for i in range(bins)]


def snr_bin_labels(edges: list[tuple[float, float]]) -> list[str]:
    """Key labels ``<lo>_<hi>`` (4 significant digits) of :func:`snr_bins` bins."""
    return [f"{_label(lo)}_{_label(hi)}" for lo, hi in edges]


def snr_bin_index(snr_db: Tensor, edges: list[tuple[float, float]]) -> Tensor:
    """The bin of each set's SNR, [b] long; values outside the range go to the end bins."""
    lo, hi = edges[0][0], edges[-1][1]
    if hi <= lo:
        return torch.zeros(snr_db.shape, dtype=torch.long, device=snr_db.device)
    position = (snr_db.double() - lo) / (hi - lo) * len(edges)
    return position.floor().long().clamp_(0, len(edges) - 1)


def k_values(spec: DistributionSpec) -> list[int]:
    """Every K the cluster prior can draw, smallest first."""
    lo, hi = _support(spec)
    return list(range(max(round(lo), 1), round(hi) + 1))


def k_index(k: Tensor, values: list[int]) -> Tensor:
    """Position of each set's K in ``values`` (contiguous integers), [b] long."""
    return (k.long() - values[0]).clamp_(0, len(values) - 1)


# Closest-centre separation bins, in noise standard deviations: below 3 sigma the two closest
# components overlap heavily (below 2 sigma two equal ones form a single mode), 3-6 they
# overlap, 6-12 they barely touch, beyond 12 a point's cluster is never in doubt and the error
# is only how precisely its mean is estimated.
SEPARATION_EDGES = (0.0, 3.0, 6.0, 12.0, math.inf)


def closest_centre_separation(centres: Tensor, k: Tensor, sigma: Tensor) -> Tensor:
    """Distance between each set's two closest real centres over its noise std, [b] float64.

    Args:
        centres [b, k_max, d] (rows >= k are padding); k [b] long, components per set (>= 2);
        sigma [b] noise standard deviation.
    """
    c = centres.double()
    k_max = c.shape[1]
    real = torch.arange(k_max, device=c.device) < k.unsqueeze(1)  # [b, k_max]
    pair = real.unsqueeze(2) & real.unsqueeze(1) & ~torch.eye(k_max, dtype=torch.bool,
                                                               device=c.device)
    distance = torch.cdist(c, c).masked_fill(~pair, math.inf)  # [b, k_max, k_max]
    return distance.flatten(1).amin(dim=1) / sigma.double()


def separation_bin_labels() -> list[str]:
    """Key labels ``<lo>_<hi>`` of the :data:`SEPARATION_EDGES` bins (the last is ``12_inf``)."""
    return [f"{_label(lo)}_{_label(hi)}" for lo, hi in pairwise(SEPARATION_EDGES)]


def separation_bin_index(separation: Tensor) -> Tensor:
    """The :data:`SEPARATION_EDGES` bin of each separation, [b] long."""
    inner = torch.tensor(SEPARATION_EDGES[1:-1], dtype=separation.dtype,
                         device=separation.device)
    return torch.bucketize(separation, inner, right=True)
