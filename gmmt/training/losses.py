"""Training losses on the predicted centres.

Each loss is first computed per set ([b]), then normalised per set
(``LossConfig.normalization``) and averaged over the sets by :func:`compute_loss`.

All per-set functions are batched (no loop over sets) and mask-aware: padded points
(``mask`` False) contribute nothing, get zero gradient, and every set averages over its own real
points; padded centres carry zero weight and are ignored. Values at padded positions may be any
junk, NaN included.

Shape legend: ``b`` sets, ``n`` points per set, ``d`` dimensions, ``k`` mixture components.
"""

import torch
from torch import Tensor

from gmmt.config.training import LossConfig
from gmmt.data.batch import GMMBatch, safe_log

__all__ = [
    "compute_loss",
    "count_loss",
    "energy_distance_per_set",
    "loss_per_set",
    "mse_per_set",
    "normalize_per_set",
    "point_weights",
    "sinkhorn_per_set",
]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the losses.


def point_weights(mask: Tensor | None, pred: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform probability weights over each set's real points.

    Args:
        mask: [b, n] bool (True = real point) or None (all points real).
        pred: [b, n, d]; gives the shape, dtype and device.

    Returns:
        weights [b, n] (1 / real count on real points, 0 on padding) and has_points [b] bool.
        A set without any real point gets uniform weights (so nothing divides by zero); its
        loss must be zeroed with ``has_points``.
    """
    b, n = pred.shape[:2]
    if mask is None:
        return (pred.new_full((b, n), 1.0 / n),
                torch.ones(b, dtype=torch.bool, device=pred.device))
    if mask.shape != (b, n):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(b, n)}")
    has_points = mask.any(dim=1)
    w = (mask | ~has_points[:, None]).to(pred.dtype)
    return w / w.sum(dim=1, keepdim=True), has_points


def _clean_points(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero padded points, [b, n, d]: junk (even NaN) there can then neither reach the loss
    through a 0 * NaN product nor receive gradient."""
    if mask is None:
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def _centre_weights(centres: Tensor, weights: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Centres [b, k, d] and their weights normalised to sum 1 per set [b, k], in ``like``'s
    dtype; zero-weight (padded) centres are zeroed for the same reason as padded points."""
    weights = weights.to(like.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True)
    centres = centres.to(like.dtype).masked_fill((weights == 0).unsqueeze(-1), 0.0)
    return centres, weights


def _check_shapes(pred: Tensor, centres: Tensor, weights: Tensor) -> None:
    if pred.ndim != 3 or centres.ndim != 3 or weights.ndim != 2:
        raise ValueError("expected pred [b, n, d], centres [b, k, d], weights [b, k]; got "
                         f"{tuple(pred.shape)}, {tuple(centres.shape)}, {tuple(weights.shape)}")
    if (centres.shape[0] != pred.shape[0] or centres.shape[2] != pred.shape[2]
            or weights.shape != centres.shape[:2]):
        raise ValueError(f"shape mismatch: pred {tuple(pred.shape)}, centres "
                         f"{tuple(centres.shape)}, weights {tuple(weights.shape)}")


# ---------------------------------------------------------------------------------------------
# Per-set losses.


def mse_per_set(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per coordinate to each point's own centre, [b].

    Args:
        pred: predicted centres [b, n, d].
        target: each point's true centre [b, n, d] (``GMMBatch.target``).
        mask: [b, n] bool, True = real point, or None.

    Returns:
        [b]: mean over real points of ||pred - target||^2 / d (0 for a set without points).
    """
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != pred {tuple(pred.shape)}")
    a, has_points = point_weights(mask, pred)
    err = (_clean_points(pred, mask) - _clean_points(target.to(pred.dtype), mask))
    per_point = err.square().mean(dim=-1)  # [b, n]
    return torch.where(has_points, (a * per_point).sum(dim=1), 0.0)


def energy_distance_per_set(pred: Tensor, centres: Tensor, weights: Tensor,
                            mask: Tensor | None = None) -> Tensor:
    """Energy distance between the predicted cloud and the weighted true centres, [b].

    X is uniform over a set's real predicted points, Y puts mass ``weights[k]`` on centre k;
    the value is 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean norm, not divided by d, so it
    has units of length). It is >= 0 and 0 exactly when the cloud equals the weighted centres
    in distribution.

    Cost O(b (n + k)^2) time and memory: the X - X' term compares every pair of points (on
    CUDA, torch's cdist backward also allocates a transient [b, n+k, n+k, d] buffer).

    Args:
        pred: predicted centres [b, n, d].
        centres: true centres [b, k, d]; padded ones have zero weight.
        weights: mixture weights [b, k] (normalised here to sum 1 per set).
        mask: [b, n] bool, True = real point, or None.
    """
    _check_shapes(pred, centres, weights)
    a, has_points = point_weights(mask, pred)
    centres, bw = _centre_weights(centres, weights, pred)
    # One signed cloud Z = X u Y with weights w = (a, -bw) gives all three terms at once:
    # sum_ij w_i w_j |z_i - z_j| = E|X-X'| - 2 E|X-Y| + E|Y-Y'| = -energy distance.
    z = torch.cat([_clean_points(pred, mask), centres], dim=1)  # [b, n+k, d]
    w = torch.cat([a, -bw], dim=1)  # [b, n+k]
    # Direct-difference cdist rather than the |z|^2 + |z'|^2 - 2 z.z' expansion: exact for the
    # near-coincident points of a converged prediction (no cancellation, no TF32 matmul), no
    # [b, n+k, n+k, d] tensor kept for backward, and its gradient at zero distance is 0 (a
    # subgradient of the norm), never NaN.
    dist = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")  # [b, n+k, n+k]
    energy = -(w.unsqueeze(1) @ dist @ w.unsqueeze(2)).reshape(-1)
    return torch.where(has_points, energy, 0.0)


def sinkhorn_per_set(pred: Tensor, centres: Tensor, weights: Tensor, mask: Tensor | None,
                     epsilon: float | Tensor, iterations: int = 50) -> Tensor:
    """Entropic optimal-transport cost between the predicted cloud and the weighted centres, [b].

    Log-domain Sinkhorn, batched over sets and masked. The cost is the squared Euclidean
    distance per coordinate, C_ik = ||x_i - mu_k||^2 / d, the same units as
    :func:`mse_per_set`: with n points on n equally weighted centres and epsilon -> 0 the value
    tends to the MSE of the best one-to-one assignment. Returns the transport cost <P, C> of the
    entropic plan P (not debiased). The iterations are unrolled under autograd, so the gradient
    is exact for the returned value; memory is O(iterations * b * n * k).

    Args:
        pred: predicted centres [b, n, d].
        centres: true centres [b, k, d]; padded ones have zero weight.
        weights: mixture weights [b, k] (normalised here to sum 1 per set).
        mask: [b, n] bool, True = real point, or None.
        epsilon: entropic regularisation, absolute, in the units of C: a float or one per set
            [b]. :func:`compute_loss` passes ``sinkhorn_epsilon * sigma^2`` so that one setting
            works across SNRs.
        iterations: Sinkhorn iterations (each updates both potentials, the points' last, so
            every real point transports exactly its own mass).
    """
    _check_shapes(pred, centres, weights)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    b, _, d = pred.shape
    eps = torch.as_tensor(epsilon, dtype=pred.dtype, device=pred.device)
    if eps.ndim == 0:
        if not float(eps) > 0:
            raise ValueError(f"epsilon must be positive, got {float(eps)}")
        eps = eps.expand(b)
    elif eps.shape != (b,):
        raise ValueError(f"epsilon has shape {tuple(eps.shape)}, expected () or ({b},)")
    a, has_points = point_weights(mask, pred)
    centres, bw = _centre_weights(centres, weights, pred)
    x = _clean_points(pred, mask)
    # Direct differences: the [b, n, k, d] tensor is small (k is) and exact.
    cost = (x.unsqueeze(2) - centres.unsqueeze(1)).square().sum(dim=-1) / d  # [b, n, k]
    scaled = cost / eps[:, None, None]
    # A transposed copy lets both half-steps reduce over the contiguous last dim (~1.5x faster
    # on CPU than reducing over n in place).
    scaled_t = scaled.transpose(1, 2).contiguous()  # [b, k, n]
    log_a = safe_log(a).unsqueeze(1)  # [b, 1, n]; -inf on padded points
    log_b = safe_log(bw).unsqueeze(1)  # [b, 1, k]; -inf on padded centres
    # Dual potentials in units of epsilon: u = f / eps on points [b, n], v = g / eps on centres.
    u = torch.zeros_like(a)
    for _ in range(iterations):
        v = -torch.logsumexp(u.unsqueeze(1) - scaled_t + log_a, dim=2)  # [b, k]
        u = -torch.logsumexp(v.unsqueeze(1) - scaled + log_b, dim=2)  # [b, n]
    log_plan = u.unsqueeze(2) + v.unsqueeze(1) - scaled + log_a.transpose(1, 2) + log_b
    plan = log_plan.exp()  # [b, n, k]
    transport = (plan * cost).sum(dim=(1, 2))
    return torch.where(has_points, transport, 0.0)


# ---------------------------------------------------------------------------------------------
# Configured loss.


def loss_per_set(config: LossConfig, pred: Tensor, batch: GMMBatch) -> Tensor:
    """The configured loss (``config.type``) of every set before normalisation, [b]."""
    if pred.shape != batch.points.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != points {tuple(batch.points.shape)}")
    if config.type == "mse":
        target = batch.target if config.target == "centre" else batch.labelled_posterior_mean
        return mse_per_set(pred, target, batch.mask)
    if config.type == "energy":
        return energy_distance_per_set(pred, batch.centres, batch.weights, batch.mask)
    if config.type == "wasserstein":
        sigma2 = batch.sigma.to(pred.dtype).square()
        return sinkhorn_per_set(pred, batch.centres, batch.weights, batch.mask,
                                config.sinkhorn_epsilon * sigma2, config.sinkhorn_iterations)
    raise ValueError(f"unknown loss type {config.type!r}")


def normalize_per_set(config: LossConfig, loss: Tensor, batch: GMMBatch) -> Tensor:
    """Scale each set's loss [b] by ``config.normalization``, [b].

    none: loss; noise_var: loss / sigma^2; snr_power: loss / signal_var * snr^p with
    snr = 10^(snr_db / 10) and p = ``snr_power_exponent`` (p = 1 equals noise_var, p = 0 divides
    by the signal variance); log: log(log_epsilon + loss / sigma^2).
    """
    kind = config.normalization
    if kind == "none":
        return loss
    sigma2 = batch.sigma.to(loss.dtype).square()
    if kind == "noise_var":
        return loss / sigma2
    if kind == "snr_power":
        snr = torch.pow(10.0, batch.snr_db.to(loss.dtype) / 10.0)
        # signal_var = sigma^2 * snr, so loss / signal_var * snr^p = loss / sigma^2 * snr^(p-1);
        # this form makes p = 1 coincide exactly with noise_var.
        return loss / sigma2 * snr.pow(config.snr_power_exponent - 1.0)
    if kind == "log":
        return torch.log(config.log_epsilon + loss / sigma2)
    raise ValueError(f"unknown loss normalization {kind!r}")


def compute_loss(config: LossConfig, pred: Tensor, batch: GMMBatch) -> Tensor:
    """Training loss: the normalised per-set loss averaged over the sets (a differentiable scalar).

    Args:
        config: the loss settings.
        pred: the model's predicted centres [b, n, d], on the batch's device.
        batch: the sets with their ground truth (``batch.mask`` marks real points).

    Low-precision predictions (bf16 / fp16) are promoted to float32 and autocast is disabled:
    the energy distance subtracts large pairwise sums and Sinkhorn exponentiates, both too
    fragile in 16-bit.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        if pred.dtype in (torch.float16, torch.bfloat16):
            pred = pred.float()
        per_set = normalize_per_set(config, loss_per_set(config, pred, batch), batch)
        return per_set.mean()


def count_loss(logits: Tensor, k: Tensor) -> Tensor:
    """Cross-entropy of the count head's logits [b, K_max] (K = 1..K_max) against the true
    K [b], averaged over the sets, in float32."""
    return torch.nn.functional.cross_entropy(logits.float(), k.to(logits.device) - 1)
