"""The batch of sets every part of gmmt passes around.

Shape legend (used throughout gmmt): ``b`` sets, ``n`` points per set, ``d`` dimensions,
``k`` mixture components (padded to K_max within a batch).
"""

import math
from dataclasses import dataclass, fields, replace

import torch


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||x_i - c_j||^2, [b, n, k] for x [b, n, d] and c [b, k, d].

    The |x|^2 + |c|^2 - 2 x.c expansion keeps memory at [b, n, k] (a direct difference would
    hold [b, n, k, d]); in float64 its cancellation error (~1e-16 |x|^2) is far below any
    noise variance we meet, and in float32 (~1e-7 |x|^2, the training target's precision) it
    moves posterior logits by ~1e-7 |x|^2 / sigma^2, negligible at the SNRs of the presets.
    Clamped at 0 against that round-off.
    """
    x2 = x.square().sum(-1, keepdim=True)  # [b, n, 1]
    c2 = c.square().sum(-1).unsqueeze(1)  # [b, 1, k]
    return torch.baddbmm(x2 + c2, x, c.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)


def safe_log(w: torch.Tensor) -> torch.Tensor:
    """log w with -inf (and no NaN gradient) where w == 0: zero-weight, i.e. padded, entries."""
    zero = w == 0
    return torch.where(zero, torch.ones_like(w), w).log().masked_fill(zero, -math.inf)


def posterior_logits(points: torch.Tensor, centres: torch.Tensor, weights: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
    """log pi_k - |x - mu_k|^2 / (2 sigma^2), [b, n, k]: each point's log posterior over the
    components under the true parameters, up to a per-point constant; -inf for padded
    (zero-weight) components. Computed in the dtype of ``points``.

    Args:
        points [b, n, d]; centres [b, k, d]; weights [b, k]; sigma [b].
    """
    mu, w = centres.to(points.dtype), weights.to(points.dtype)
    log_w = safe_log(w)
    # The Gaussian's normaliser is the same for every component (shared sigma): it cancels.
    scaled = squared_distances(points, mu) / (2 * sigma.to(points.dtype).square()).view(-1, 1, 1)
    return log_w.unsqueeze(1) - scaled


@dataclass
class GMMBatch:
    """Sets drawn from random GMMs, with the ground truth that generated them.

    Padded components (index >= k of a set) have zero weight and zero centre. ``mask`` is
    ``None`` when every set has the same number of points; otherwise True marks real points.
    """

    points: torch.Tensor  # [b, n, d] float
    labels: torch.Tensor  # [b, n] long, component of each point
    centres: torch.Tensor  # [b, k, d] float
    weights: torch.Tensor  # [b, k] float, zero for padded components
    sigma: torch.Tensor  # [b] float, noise standard deviation
    snr_db: torch.Tensor  # [b] float
    k: torch.Tensor  # [b] long, number of real components
    mask: torch.Tensor | None = None  # [b, n] bool, True = real point
    centre_scale: torch.Tensor | None = None  # [b] float, centres were drawn from N(0, s^2 I)
    weight_concentration: torch.Tensor | None = None  # [b] float, weights ~ Dirichlet(alpha 1)
    k_prior: torch.Tensor | None = None  # [b, k] float, P(K = 1..k) of the prior drawn from

    @property
    def num_sets(self) -> int:
        return self.points.shape[0]

    @property
    def target(self) -> torch.Tensor:
        """Each point's true centre, [b, n, d] (what a perfect denoiser would output)."""
        index = self.labels.unsqueeze(-1).expand(-1, -1, self.centres.shape[-1])
        return torch.gather(self.centres, 1, index)

    @property
    def labelled_posterior_mean(self) -> torch.Tensor:
        """Each point's posterior-mean centre given all points, the *other* points' labels,
        the true weights and sigma, under the centres' prior N(0, centre_scale^2 I), [b, n, d].

        By the tower property its expectation given the points alone is the Bayes estimate of
        the point's centre, the same minimiser as the true centre's; unlike the true centre
        it does not carry the centres' offset from their clusters' sample means, which nothing
        that sees the points can predict (on a well separated cluster it is that cluster's
        sample mean, shrunk by the prior by ~1 / (n_k snr)).
        Needs ``centre_scale``; padded points get 0. Computed in at least float32.

        It is the exact conditional mean when sigma is drawn independently of the centres.
        ``sample_gmm_batch`` sets sigma from the centres' spread and the SNR, a link this
        prior leaves out; the bias that leaves shrinks with the cluster sizes (measured in
        docs/experiments.md).

        For point i and component k, with n' points and sum S' of the others labelled k and
        a = n' + sigma^2 / s^2: the centre's posterior from the others is N(S' / a, sigma^2 / a),
        point i's predictive is N(S' / a, sigma^2 (1 + 1 / a)), and if i belongs to k the
        posterior mean is (S' + x_i) / (a + 1). The target mixes these over k by
        pi_k x predictive density.
        """
        if self.centre_scale is None:
            raise ValueError("labelled_posterior_mean needs the batch's centre_scale (batches "
                             "from gmmt.data.sample_gmm_batch carry it)")
        dtype = torch.promote_types(self.points.dtype, torch.float32)
        x = self.points.to(dtype)
        k_max, d = self.centres.shape[1], x.shape[-1]
        own = torch.nn.functional.one_hot(self.labels, k_max).to(dtype)  # [b, n, k]
        if self.mask is not None:
            x = x.masked_fill(~self.mask.unsqueeze(-1), 0.0)
            own = own * self.mask.unsqueeze(-1).to(dtype)
        sigma2 = self.sigma.to(dtype).square().view(-1, 1, 1)
        ratio = sigma2 / self.centre_scale.to(dtype).square().view(-1, 1, 1)

        sums = own.transpose(1, 2) @ x  # [b, k, d]
        x2 = x.square().sum(-1, keepdim=True)  # [b, n, 1]
        x_dot_sums = x @ sums.transpose(1, 2)  # [b, n, k]
        # The others' count, x_i . S' and |S'|^2 with point i taken out of its own component.
        a = own.sum(1, keepdim=True) - own + ratio  # [b, n, k]
        x_dot_rest = x_dot_sums - own * x2
        rest2 = sums.square().sum(-1).unsqueeze(1) - 2 * own * x_dot_sums + own * x2
        dist2 = (x2 - 2 * x_dot_rest / a + rest2 / a.square()).clamp_min(0.0)
        var = sigma2 * (1 + 1 / a)
        w = self.weights.to(dtype)
        log_w = safe_log(w).unsqueeze(1)
        resp = torch.softmax(log_w - 0.5 * d * var.log() - dist2 / (2 * var), dim=-1)

        # sum_k r_k (S_k - own_k x_i + x_i) / (a_k + 1), without a [b, n, k, d] tensor.
        scale = resp / (a + 1)
        mean = scale @ sums + x * (scale * (1 - own)).sum(-1, keepdim=True)
        if self.mask is not None:
            mean = mean.masked_fill(~self.mask.unsqueeze(-1), 0.0)
        return mean.to(self.points.dtype)

    @property
    def signal_var(self) -> torch.Tensor:
        """Per-coordinate weighted variance of the centres, [b] (sigma^2 * 10^(snr/10))."""
        return self.sigma.square() * torch.pow(10.0, self.snr_db / 10.0)

    def point_counts(self) -> torch.Tensor:
        """Real points per set, [b] long."""
        if self.mask is None:
            return torch.full((self.num_sets,), self.points.shape[1], dtype=torch.long,
                              device=self.points.device)
        return self.mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "GMMBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def slice(self, start: int, stop: int) -> "GMMBatch":
        """Sets ``start:stop`` of the batch."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop]
                                for f in fields(self) if getattr(self, f.name) is not None})
