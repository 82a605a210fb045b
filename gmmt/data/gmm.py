"""Batched generation of sets drawn from random isotropic Gaussian mixtures.

A batch is a pure function of (seed, stream, rank, step): :func:`derive_seed` mixes them into
the seed of a fresh ``torch.Generator``, so resuming needs no loader state, every rank draws
different sets, and the validation bank (its own stream) is the same on every rank.

Shape legend: b sets, n points, d dimensions, k components (padded to K_max).
"""

import hashlib
import math

import torch

from gmmt.config.data import DataConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.distributions import integer_probabilities, sample

TRAIN_STREAM = "train"
VALIDATION_STREAM = "validation"


def derive_seed(seed: int, stream: str, rank: int, step: int) -> int:
    """A 63-bit generator seed, a fixed function of (seed, stream, rank, step).

    BLAKE2b rather than ``hash()``: Python's string hash is salted per process, and neighbouring
    (step, rank) pairs must give unrelated seeds, which a cryptographic mix guarantees.
    """
    key = f"gmmt-data|{seed}|{stream}|{rank}|{step}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (torch needs it on the device it feeds)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def _dirichlet_log_weights(alpha: float, real: torch.Tensor, generator: torch.Generator,
                           dtype: torch.dtype) -> torch.Tensor:
    """Logs of Gamma(alpha) draws for the real components, -inf for padded ones, [b, k].

    ``torch._standard_gamma`` is the sampler behind ``torch.distributions.Gamma``, and unlike
    that class it takes a generator. Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha), taken in
    log space: for small alpha a plain Gamma draw underflows to 0 in float32 often enough that a
    whole set could get all-zero weights; its logarithm cannot.
    """
    shape = real.shape
    concentration = torch.full(shape, alpha + 1.0, dtype=dtype, device=real.device)
    gamma = torch._standard_gamma(concentration, generator=generator)
    u = 1.0 - torch.rand(shape, generator=generator, device=real.device, dtype=dtype)  # (0, 1]
    log_gamma = torch.log(gamma) + torch.log(u) / alpha
    return log_gamma.masked_fill(~real, -math.inf)


def sample_gmm_batch(config: DataConfig, batch_size: int, generator: torch.Generator,
                     device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> GMMBatch:
    """Draw ``batch_size`` sets from the prior in ``config`` using only ``generator``.

    Every set gets its own K, weights, centres and SNR. N is one value for the whole batch
    (no mask) unless ``config.ragged``, when every set gets its own N, points are padded to the
    largest (padded points are zero, their labels 0) and ``mask`` marks the real ones.
    """
    device = torch.device(device)
    b, d, k_max = batch_size, config.dim, config.max_clusters

    # The order of the draws below is part of the data definition: changing it changes every
    # batch for a given seed.
    k = sample(config.cluster_params, (b,), generator, device, integer=True).clamp_(max=k_max)
    real = torch.arange(k_max, device=device) < k.unsqueeze(1)  # [b, k]
    log_gamma = _dirichlet_log_weights(config.weight_concentration, real, generator, dtype)
    weights = torch.softmax(log_gamma, dim=1)  # normalised Gamma draws: Dirichlet(alpha 1_K)
    centres = torch.randn((b, k_max, d), generator=generator, device=device, dtype=dtype)
    centres = centres * config.center_scale * real.unsqueeze(-1)
    snr_db = sample(config.snr_db_params, (b,), generator, device, dtype=dtype)

    signal_var = weighted_centre_variance(centres, weights)
    sigma = torch.sqrt(signal_var / torch.pow(10.0, snr_db / 10.0))

    if config.ragged:
        counts = sample(config.sample_count_distribution, (b,), generator, device, integer=True)
        n = int(counts.max())
        mask = torch.arange(n, device=device) < counts.unsqueeze(1)  # [b, n]
    else:
        n = int(sample(config.sample_count_distribution, (1,), generator, device, integer=True))
        mask = None

    # Labels by inverse CDF of the weights. Zero-weight (padded) components own an empty
    # interval; the clamp catches a u above a cumulative sum that rounded to just under 1.
    cdf = torch.cumsum(weights, dim=1)  # [b, k]
    u = torch.rand((b, n), generator=generator, device=device, dtype=dtype)
    labels = torch.searchsorted(cdf, u, right=True)
    labels = torch.minimum(labels, (k - 1).unsqueeze(1))  # [b, n]

    noise = torch.randn((b, n, d), generator=generator, device=device, dtype=dtype)
    index = labels.unsqueeze(-1).expand(-1, -1, d)
    points = torch.gather(centres, 1, index) + sigma.view(b, 1, 1) * noise
    if mask is not None:
        labels = labels.masked_fill(~mask, 0)  # component 0 is always real
        points = points.masked_fill(~mask.unsqueeze(-1), 0.0)
    return GMMBatch(points=points, labels=labels, centres=centres, weights=weights, sigma=sigma,
                    snr_db=snr_db, k=k, mask=mask,
                    centre_scale=torch.full((b,), config.center_scale, device=device, dtype=dtype),
                    weight_concentration=torch.full((b,), config.weight_concentration,
                                                    device=device, dtype=dtype),
                    k_prior=integer_probabilities(config.cluster_params, k_max).to(
                        device, dtype).repeat(b, 1))


def weighted_centre_variance(centres: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-coordinate weighted variance of the centres, s2 = (1/d) sum_jk pi_k (mu_kj - mubar_j)^2.

    Args:
        centres: [b, k, d]; weights: [b, k], summing to 1 (zero for padded components).

    Returns:
        [b]
    """
    mean = torch.einsum("bk,bkd->bd", weights, centres)
    spread = (centres - mean.unsqueeze(1)).square().sum(dim=-1)  # [b, k]
    return (weights * spread).sum(dim=1) / centres.shape[-1]


class GMMSampler:
    """Reproducible batches for training: ``batch(step, ...)`` depends on nothing but its inputs.

    Args:
        config: the data prior.
        seed: the experiment seed.
        device: where batches are generated (the training device: no host-to-device copies).
        dtype: float dtype of points, centres, weights, sigma and SNR.
    """

    def __init__(self, config: DataConfig, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype

    def generator(self, step: int, rank: int = 0, stream: str = TRAIN_STREAM) -> torch.Generator:
        """The generator that batch (step, rank, stream) is drawn from."""
        return make_generator(derive_seed(self.seed, stream, rank, step), self.device)

    def batch(self, step: int, batch_size: int, rank: int = 0,
              stream: str = TRAIN_STREAM) -> GMMBatch:
        """Sets for optimizer/micro step ``step`` on process ``rank``."""
        return sample_gmm_batch(self.config, batch_size, self.generator(step, rank, stream),
                                self.device, self.dtype)


def validation_bank(config: DataConfig, seed: int, num_sets: int, batch_size: int,
                    device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> list[GMMBatch]:
    """A fixed validation set: ``num_sets`` sets in batches of ``batch_size`` (the last may be
    smaller), drawn from the ``"validation"`` stream with rank 0 so every process holds the same
    bank. Batch ``i`` is step ``i`` of that stream.
    """
    if num_sets < 1 or batch_size < 1:
        raise ValueError(f"num_sets and batch_size must be >= 1, got {num_sets}, {batch_size}")
    sampler = GMMSampler(config, seed, device, dtype)
    return [sampler.batch(i, min(batch_size, num_sets - start), rank=0, stream=VALIDATION_STREAM)
            for i, start in enumerate(range(0, num_sets, batch_size))]
