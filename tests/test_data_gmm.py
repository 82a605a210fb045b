"""The batched set generator draws as docs/design.md says and is a pure function of its inputs."""

import dataclasses
import math

import pytest
import torch

from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.config.presets import resolve_config
from gmmt.data.batch import GMMBatch, posterior_logits
from gmmt.data.gmm import (
    GMMSampler,
    derive_seed,
    make_generator,
    sample_gmm_batch,
    validation_bank,
)


def _fixed(value: float) -> DistributionSpec:
    return DistributionSpec(type="fixed", value=value)


def _uniform(lo: float, hi: float) -> DistributionSpec:
    return DistributionSpec(type="uniform", min=lo, max=hi)


def _draw(config: DataConfig, batch_size: int, seed: int = 0) -> GMMBatch:
    return sample_gmm_batch(config, batch_size, make_generator(seed))


def _same(a: GMMBatch, b: GMMBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("points", "labels", "centres", "weights", "sigma", "snr_db", "k")) \
        and ((a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask))


def test_shapes_and_dtypes() -> None:
    config = DataConfig()  # K 2-4, N 100-500, d 2
    batch = _draw(config, 16)
    n = batch.points.shape[1]
    assert 100 <= n <= 500 and batch.mask is None
    assert batch.points.shape == (16, n, 2) and batch.points.dtype == torch.float32
    assert batch.labels.shape == (16, n) and batch.labels.dtype == torch.long
    assert batch.centres.shape == (16, 4, 2) and batch.weights.shape == (16, 4)
    assert batch.sigma.shape == batch.snr_db.shape == batch.k.shape == (16,)
    assert batch.k.dtype == torch.long
    double = sample_gmm_batch(config, 4, make_generator(0), dtype=torch.float64)
    assert double.points.dtype == double.weights.dtype == double.sigma.dtype == torch.float64


def test_k_weights_and_padding() -> None:
    config = DataConfig(cluster_params=_uniform(2, 6), sample_count_distribution=_fixed(8))
    batch = _draw(config, 4000)
    k = batch.k
    assert batch.centres.shape[1] == config.max_clusters == 6
    assert sorted(k.unique().tolist()) == [2, 3, 4, 5, 6]
    for value in range(2, 7):  # integer uniform: ends as likely as the middle
        freq = (k == value).double().mean().item()
        assert abs(freq - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 4000)
    padded = torch.arange(6) >= k.unsqueeze(1)
    assert bool((batch.weights[padded] == 0).all())
    assert bool((batch.centres[padded] == 0).all())
    assert bool((batch.weights[~padded] > 0).all())
    torch.testing.assert_close(batch.weights.sum(1), torch.ones(4000), atol=1e-5, rtol=0)
    assert bool((batch.labels < k.unsqueeze(1)).all()) and bool((batch.labels >= 0).all())


def test_dirichlet_and_centre_moments() -> None:
    alpha, kk, scale = 2.0, 3, 2.5
    config = DataConfig(cluster_params=_fixed(kk), sample_count_distribution=_fixed(1),
                        weight_concentration=alpha, center_scale=scale, dim=3)
    batch = _draw(config, 20000)
    w = batch.weights.double()
    expected_var = (1 / kk) * (1 - 1 / kk) / (kk * alpha + 1)
    torch.testing.assert_close(w.mean(0), torch.full((kk,), 1 / kk, dtype=torch.float64),
                               atol=5 * math.sqrt(expected_var / 20000), rtol=0)
    assert bool(((w.var(0) / expected_var - 1).abs() < 0.05).all())
    centres = batch.centres.double()
    assert abs(centres.mean().item()) < 5 * scale / math.sqrt(centres.numel())
    assert abs(centres.std().item() / scale - 1) < 0.02


def test_tiny_concentration_gives_valid_weights() -> None:
    """alpha = 0.02: plain float32 Gamma draws would often underflow to all-zero weights."""
    config = DataConfig(cluster_params=_fixed(4), sample_count_distribution=_fixed(2),
                        weight_concentration=0.02)
    batch = _draw(config, 4000)
    assert bool(torch.isfinite(batch.weights).all()) and bool(torch.isfinite(batch.points).all())
    torch.testing.assert_close(batch.weights.sum(1), torch.ones(4000), atol=1e-5, rtol=0)
    assert batch.weights.max(1).values.mean() > 0.9  # sparse, as a small alpha should be


def test_empirical_snr_matches_requested() -> None:
    config = DataConfig(dim=3, cluster_params=_uniform(2, 8), snr_db_params=_uniform(-5, 20),
                        sample_count_distribution=_fixed(2000))
    batch = _draw(config, 256)
    assert batch.snr_db.min() >= -5 and batch.snr_db.max() <= 20
    centres, weights = batch.centres.double(), batch.weights.double()
    # Signal variance recomputed here from its definition, independently of the generator.
    mean = (weights.unsqueeze(-1) * centres).sum(1, keepdim=True)
    s2 = (weights.unsqueeze(-1) * (centres - mean) ** 2).sum((1, 2)) / config.dim
    torch.testing.assert_close(batch.signal_var.double(), s2, rtol=1e-4, atol=0)
    noise = batch.points.double() - batch.target.double()
    noise_var = noise.square().mean((1, 2))
    torch.testing.assert_close(noise_var.sqrt(), batch.sigma.double(), rtol=0.1, atol=0)
    error_db = 10 * torch.log10(s2 / noise_var) - batch.snr_db.double()
    assert abs(error_db.mean().item()) < 0.05  # per set ~0.1 dB of sampling noise
    assert error_db.abs().max().item() < 0.5


def test_labels_follow_weights() -> None:
    config = DataConfig(cluster_params=_uniform(2, 5), sample_count_distribution=_fixed(20000))
    batch = _draw(config, 32)
    counts = torch.zeros(32, 5).scatter_add_(1, batch.labels, torch.ones(32, 20000))
    w = batch.weights.double()
    tolerance = 5 * torch.sqrt(w * (1 - w) / 20000) + 1e-9
    assert bool(((counts.double() / 20000 - w).abs() <= tolerance).all())


def test_one_point_count_per_batch_by_default() -> None:
    sampler = GMMSampler(DataConfig(), seed=3)
    sizes = {sampler.batch(step, 2).points.shape[1] for step in range(40)}
    assert len(sizes) > 20 and min(sizes) >= 100 and max(sizes) <= 500


def test_ragged_masks_match_point_counts() -> None:
    config = DataConfig(ragged=True, sample_count_distribution=_uniform(5, 60))
    batch = _draw(config, 500)
    mask = batch.mask
    counts = mask.sum(1)
    assert mask.dtype == torch.bool and mask.shape == batch.labels.shape
    assert counts.min() >= 5 and counts.max() <= 60 and batch.points.shape[1] == counts.max()
    assert len(counts.unique()) > 40
    torch.testing.assert_close(batch.point_counts(), counts)
    # Real points come first: the mask is a prefix of each row.
    assert torch.equal(mask, torch.arange(mask.shape[1]) < counts.unsqueeze(1))
    assert bool((batch.points[~mask] == 0).all()) and bool((batch.labels[~mask] == 0).all())
    assert bool((batch.labels < batch.k.unsqueeze(1)).all())
    assert bool((batch.points[mask] != 0).all())


def test_batch_is_a_pure_function_of_seed_stream_rank_step() -> None:
    config = DataConfig(ragged=True)
    a, b = GMMSampler(config, seed=11), GMMSampler(config, seed=11)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = a.batch(5, 8, rank=1)
    torch.manual_seed(1)  # the global RNG plays no part
    assert _same(first, b.batch(5, 8, rank=1))
    assert _same(first, a.batch(5, 8, rank=1))  # no hidden state advances between calls
    others = (a.batch(6, 8, rank=1), a.batch(5, 8, rank=0),
              a.batch(5, 8, rank=1, stream="validation"), GMMSampler(config, 12).batch(5, 8, 1))
    for other in others:
        assert not torch.equal(first.centres, other.centres)
    torch.manual_seed(0)
    a.batch(0, 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_derive_seed_is_fixed_and_63_bit() -> None:
    # Pinned: changing the mixing function silently changes every experiment's data.
    assert derive_seed(0, "train", 0, 0) == 178492700980466215
    seeds = {derive_seed(s, st, r, t) for s in (0, 1) for st in ("train", "validation")
             for r in range(4) for t in range(50)}
    assert len(seeds) == 2 * 2 * 4 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_validation_bank() -> None:
    config = DataConfig()
    bank = validation_bank(config, seed=5, num_sets=10, batch_size=4, device="cpu")
    assert [batch.num_sets for batch in bank] == [4, 4, 2]
    again = validation_bank(config, seed=5, num_sets=10, batch_size=4, device="cpu")
    assert all(_same(x, y) for x, y in zip(bank, again))
    train = GMMSampler(config, seed=5).batch(0, 4)
    assert not torch.equal(bank[0].centres, train.centres)
    with pytest.raises(ValueError):
        validation_bank(config, seed=5, num_sets=0, batch_size=4, device="cpu")


@pytest.mark.parametrize("preset", ["simple", "standard", "complex"])
def test_data_presets(preset: str) -> None:
    data = resolve_config("quick_test", data=preset).config.data
    batch = GMMSampler(data, seed=0).batch(0, 8)
    lo, hi = data.cluster_params.support()
    assert bool((batch.k >= lo).all()) and bool((batch.k <= hi).all())
    assert batch.centres.shape[1] == data.max_clusters
    assert data.sample_count_distribution.support()[0] <= batch.points.shape[1] <= data.max_points
    snr_lo, snr_hi = data.snr_db_params.support()
    assert bool((batch.snr_db >= snr_lo).all()) and bool((batch.snr_db <= snr_hi).all())


def _labelled_posterior_mean_by_loop(batch: GMMBatch) -> torch.Tensor:
    """The labelled posterior mean point by point, straight from its definition."""
    out = torch.zeros_like(batch.points)
    d = batch.points.shape[-1]
    for s in range(batch.num_sets):
        sigma2 = float(batch.sigma[s]) ** 2
        ratio = sigma2 / float(batch.centre_scale[s]) ** 2
        real = range(batch.points.shape[1]) if batch.mask is None else \
            [int(j) for j in batch.mask[s].nonzero()]
        for i in real:
            x = batch.points[s, i]
            logits, means = [], []
            for k in range(batch.centres.shape[1]):
                others = [j for j in real if j != i and int(batch.labels[s, j]) == k]
                rest = batch.points[s, others].sum(0) if others else torch.zeros_like(x)
                a = len(others) + ratio
                var = sigma2 * (1 + 1 / a)
                weight = float(batch.weights[s, k])
                logits.append(math.log(weight) - 0.5 * d * math.log(var)
                              - float((x - rest / a).square().sum()) / (2 * var)
                              if weight > 0 else -math.inf)
                means.append((rest + x) / (a + 1))
            resp = torch.softmax(torch.tensor(logits, dtype=x.dtype), 0)
            out[s, i] = sum(r * m for r, m in zip(resp, means, strict=True))
    return out


def test_labelled_posterior_mean_matches_its_definition_with_padding() -> None:
    # Ragged sets (padded points) with K 2-4 of 4 (padded components), few points per set so
    # that singletons and empty components occur.
    config = DataConfig(ragged=True, sample_count_distribution=_uniform(2, 9),
                        cluster_params=_uniform(2, 4), snr_db_params=_uniform(0, 10))
    batch = sample_gmm_batch(config, 12, make_generator(4), dtype=torch.float64)
    assert not bool(batch.mask.all()) and bool((batch.k < 4).any())
    got = batch.labelled_posterior_mean
    torch.testing.assert_close(got, _labelled_posterior_mean_by_loop(batch))
    assert bool((got[~batch.mask] == 0).all())


def test_labelled_posterior_mean_is_the_sample_mean_of_a_clear_cluster() -> None:
    # 30 dB, 200 points: nearly every label is certain, and for those points the target is
    # the point's cluster mean, shrunk towards the prior's 0 by sigma^2 / s^2 pseudo-points.
    config = DataConfig(snr_db_params=_fixed(30.0), sample_count_distribution=_fixed(200),
                        weight_concentration=50.0)
    batch = sample_gmm_batch(config, 16, make_generator(0), dtype=torch.float64)
    own = torch.nn.functional.one_hot(batch.labels, config.max_clusters).double()
    ratio = (batch.sigma / batch.centre_scale).square().view(-1, 1, 1)
    shrunk_means = (own.transpose(1, 2) @ batch.points) / (own.sum(1).unsqueeze(-1) + ratio)
    expected = torch.gather(shrunk_means, 1, batch.labels.unsqueeze(-1).expand(-1, -1, 2))
    clear = torch.softmax(posterior_logits(batch.points, batch.centres, batch.weights,
                                           batch.sigma), -1).amax(-1) > 1 - 1e-12
    assert float(clear.double().mean()) > 0.95
    torch.testing.assert_close(batch.labelled_posterior_mean[clear], expected[clear])
    # ... which is not the true centre: the sample mean's own error is gone from the target.
    assert float((batch.target - expected).norm(dim=-1).div(batch.sigma.view(-1, 1)).mean()) > 0.03


def test_labelled_posterior_mean_target_has_the_same_minimiser() -> None:
    # E ||f - mu_z||^2 = E ||f - t||^2 + const for any f(X) when E[t | X] = E[mu_z | X]: the
    # two targets rank every predictor the same way. The predictors may only use the points:
    # the target conditions on the other points' labels, which they cannot see. The sets are drawn
    # with sigma independent of the centres, where the target is the exact conditional mean
    # (the generator ties sigma to the centres' spread through the SNR; see the property).
    g = torch.Generator().manual_seed(5)
    config = DataConfig(snr_db_params=_fixed(3.0), sample_count_distribution=_fixed(8))
    batch = sample_gmm_batch(config, 4000, make_generator(0), dtype=torch.float64)
    batch.sigma = 0.3 + 0.4 * torch.rand(batch.sigma.shape, generator=g, dtype=torch.float64)
    batch.points = batch.target + batch.sigma.view(-1, 1, 1) * torch.randn(
        batch.points.shape, generator=g, dtype=torch.float64)
    points, centre = batch.points, batch.target
    set_mean = points.mean(1, keepdim=True).expand_as(points)
    predictors = (points, 0.5 * points + 0.5 * set_mean, torch.zeros_like(points), set_mean)

    def spread(target: torch.Tensor) -> float:
        gaps = [((p - centre).square().mean() - (p - target).square().mean()).item()
                for p in predictors]
        return (max(gaps) - min(gaps)) / (target - centre).square().mean().item()

    assert spread(batch.labelled_posterior_mean) < 0.1
    # The check has teeth: a 20 % wrong sigma or a 30 % narrower prior gives > 0.7.
    assert spread(dataclasses.replace(batch, sigma=1.2 * batch.sigma).labelled_posterior_mean) > 0.5
    assert spread(dataclasses.replace(batch, centre_scale=0.7 * batch.centre_scale)
                  .labelled_posterior_mean) > 0.5


def test_labelled_posterior_mean_needs_the_centre_scale() -> None:
    batch = dataclasses.replace(_draw(DataConfig(), 2), centre_scale=None)
    with pytest.raises(ValueError, match="centre_scale"):
        _ = batch.labelled_posterior_mean
