"""Tests of gmmt.training.losses on tiny hand-built batches (float64 unless stated)."""

import itertools
import math

import pytest
import torch

from gmmt.config.training import LossConfig
from gmmt.data.batch import GMMBatch
from gmmt.training.losses import (
    compute_loss,
    energy_distance_per_set,
    loss_per_set,
    mse_per_set,
    normalize_per_set,
    sinkhorn_per_set,
)

DTYPE = torch.float64


def make_batch(b: int = 3, n: int = 10, d: int = 2, k: int = 3, seed: int = 0,
               mask: torch.Tensor | None = None) -> GMMBatch:
    """A small batch; the last set has one padded (zero-weight) component."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(b, k, d, generator=g, dtype=DTYPE)
    weights = torch.rand(b, k, generator=g, dtype=DTYPE) + 0.2
    ks = torch.full((b,), k)
    if k > 2:
        weights[-1, -1] = 0.0
        centres[-1, -1] = 0.0
        ks[-1] = k - 1
    weights = weights / weights.sum(dim=1, keepdim=True)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    sigma = 0.1 + 0.4 * torch.rand(b, generator=g, dtype=DTYPE)
    snr_db = 3.0 + 12.0 * torch.rand(b, generator=g, dtype=DTYPE)
    batch = GMMBatch(points=torch.zeros(b, n, d, dtype=DTYPE), labels=labels, centres=centres,
                     weights=weights, sigma=sigma, snr_db=snr_db, k=ks, mask=mask)
    batch.points = batch.target + sigma[:, None, None] * torch.randn(b, n, d, generator=g,
                                                                     dtype=DTYPE)
    return batch


def pad(batch: GMMBatch, pred: torch.Tensor, extra: int, junk: float = float("nan"),
        seed: int = 1) -> tuple[GMMBatch, torch.Tensor]:
    """Append ``extra`` junk points per set under mask=False (interleaved, not only at the end)."""
    b, n, d = pred.shape
    g = torch.Generator().manual_seed(seed)
    total = n + extra
    # Real points go to a random subset of the slots of each set.
    order = torch.stack([torch.randperm(total, generator=g) for _ in range(b)])
    real_slots = order[:, :n].sort(dim=1).values
    mask = torch.zeros(b, total, dtype=torch.bool)
    mask.scatter_(1, real_slots, True)
    new_pred = torch.full((b, total, d), junk, dtype=DTYPE)
    new_pred[mask] = pred.reshape(-1, d)
    points = torch.full((b, total, d), junk, dtype=DTYPE)
    points[mask] = batch.points.reshape(-1, d)
    labels = torch.zeros(b, total, dtype=torch.long)
    labels[mask] = batch.labels.reshape(-1)
    padded = GMMBatch(points=points, labels=labels, centres=batch.centres,
                      weights=batch.weights, sigma=batch.sigma, snr_db=batch.snr_db,
                      k=batch.k, mask=mask)
    return padded, new_pred


def proportional_cloud(centres: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One set [1, sum(counts), d]: counts[j] copies of centre j."""
    return torch.cat([centres[0, j].expand(c, -1) for j, c in enumerate(counts)]).unsqueeze(0)


def energy_reference(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """Plain double loop over pairs for one set: x [n, d] uniform, y [k, d] with weights w."""
    n = x.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=DTYPE)
    xy = sum(a[i] * w[j] * (x[i] - y[j]).norm() for i in range(n) for j in range(len(y)))
    xx = sum(a[i] * a[j] * (x[i] - x[j]).norm() for i in range(n) for j in range(n))
    yy = sum(w[i] * w[j] * (y[i] - y[j]).norm() for i in range(len(y)) for j in range(len(y)))
    return float(2 * xy - xx - yy)


def exact_assignment_cost(x: torch.Tensor, y: torch.Tensor) -> float:
    """Brute-force OT between n points and n equally weighted centres (per-coordinate cost)."""
    n, d = x.shape
    cost = (x[:, None] - y[None]).square().sum(-1) / d
    return min(float(sum(cost[i, p[i]] for i in range(n))) / n
               for p in itertools.permutations(range(n)))


# ---------------------------------------------------------------------------------------------
# Values at and near the target.


def test_mse_zero_at_target_and_matches_definition() -> None:
    batch = make_batch()
    assert torch.equal(mse_per_set(batch.target, batch.target), torch.zeros(3, dtype=DTYPE))
    pred = batch.points
    expected = ((pred - batch.target) ** 2).sum(-1).sum(-1) / (pred.shape[1] * pred.shape[2])
    torch.testing.assert_close(mse_per_set(pred, batch.target), expected)


def test_labelled_posterior_mean_target_scores_itself_zero() -> None:
    batch = make_batch(seed=4)
    batch.centre_scale = torch.full((3,), 2.0, dtype=DTYPE)  # make_batch's centres: N(0, 2^2)
    labelled = LossConfig(target="labelled_posterior_mean")
    target = batch.labelled_posterior_mean
    assert torch.equal(loss_per_set(labelled, target, batch), torch.zeros(3, dtype=DTYPE))
    assert loss_per_set(LossConfig(), target, batch).sum() > 0  # not the true centres
    torch.testing.assert_close(loss_per_set(labelled, batch.points, batch),
                               mse_per_set(batch.points, target))


def test_energy_zero_when_cloud_matches_weighted_centres() -> None:
    centres = torch.tensor([[[0.0, 0.0], [3.0, 1.0], [-1.0, 2.0]]], dtype=DTYPE)
    weights = torch.tensor([[0.5, 0.25, 0.25]], dtype=DTYPE)
    cloud = proportional_cloud(centres, [4, 2, 2])
    energy = energy_distance_per_set(cloud, centres, weights)
    assert abs(float(energy)) < 1e-12
    # Wrong proportions (or a shifted cloud) give a positive distance.
    assert float(energy_distance_per_set(proportional_cloud(centres, [2, 4, 2]), centres,
                                         weights)) > 1e-3
    assert float(energy_distance_per_set(cloud + 0.1, centres, weights)) > 1e-3


def test_energy_matches_pairwise_reference() -> None:
    batch = make_batch(b=2, n=7, k=3, seed=3)
    got = energy_distance_per_set(batch.points, batch.centres, batch.weights)
    for s in range(2):
        ref = energy_reference(batch.points[s], batch.centres[s], batch.weights[s])
        assert math.isclose(float(got[s]), ref, rel_tol=1e-10, abs_tol=1e-12)
        assert ref > 0


def test_sinkhorn_near_zero_when_cloud_matches_weighted_centres() -> None:
    centres = torch.tensor([[[0.0, 0.0], [3.0, 1.0], [-1.0, 2.0]]], dtype=DTYPE)
    weights = torch.tensor([[0.5, 0.25, 0.25]], dtype=DTYPE)
    cloud = proportional_cloud(centres, [4, 2, 2])
    value = sinkhorn_per_set(cloud, centres, weights, None, epsilon=0.05, iterations=50)
    assert 0.0 <= float(value) < 1e-10


def test_sinkhorn_converges_to_exact_ot_as_epsilon_shrinks() -> None:
    g = torch.Generator().manual_seed(7)
    n, d = 5, 2
    x = torch.randn(1, n, d, generator=g, dtype=DTYPE)
    y = torch.randn(1, n, d, generator=g, dtype=DTYPE)
    w = torch.full((1, n), 1.0 / n, dtype=DTYPE)
    exact = exact_assignment_cost(x[0], y[0])
    scale = float((x[0, :, None] - y[0, None]).square().sum(-1).mean() / d)
    errors = []
    for rel_eps, iters in [(1e-1, 200), (1e-2, 1000), (1e-3, 5000)]:
        value = float(sinkhorn_per_set(x, y, w, None, rel_eps * scale, iters))
        errors.append(abs(value - exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * exact


def test_sinkhorn_epsilon_per_set_equals_separate_calls() -> None:
    batch = make_batch(b=3, seed=4)
    eps = torch.tensor([0.01, 0.1, 1.0], dtype=DTYPE)
    together = sinkhorn_per_set(batch.points, batch.centres, batch.weights, None, eps, 30)
    for s in range(3):
        alone = sinkhorn_per_set(batch.points[s:s + 1], batch.centres[s:s + 1],
                                 batch.weights[s:s + 1], None, float(eps[s]), 30)
        torch.testing.assert_close(together[s:s + 1], alone)


# ---------------------------------------------------------------------------------------------
# Gradients.


def _gradcheck(fn, pred: torch.Tensor) -> None:
    pred = pred.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_mse() -> None:
    batch = make_batch(b=2, n=5, seed=5)
    _gradcheck(lambda p: mse_per_set(p, batch.target), batch.points)


def test_gradcheck_energy() -> None:
    batch = make_batch(b=2, n=5, seed=6)
    _gradcheck(lambda p: energy_distance_per_set(p, batch.centres, batch.weights), batch.points)


def test_gradcheck_sinkhorn() -> None:
    batch = make_batch(b=2, n=5, seed=8)
    _gradcheck(lambda p: sinkhorn_per_set(p, batch.centres, batch.weights, None, 0.3, 20),
               batch.points)


@pytest.mark.parametrize("kind", ["mse", "energy", "wasserstein"])
def test_gradcheck_compute_loss_with_mask(kind: str) -> None:
    batch = make_batch(b=2, n=4, seed=9)
    padded, pred = pad(batch, batch.points, extra=2, junk=5.0)
    config = LossConfig(type=kind, normalization="noise_var", sinkhorn_iterations=20,
                        sinkhorn_epsilon=0.5)
    _gradcheck(lambda p: compute_loss(config, p, padded), pred)


def test_energy_gradient_finite_at_coincident_points() -> None:
    centres = torch.tensor([[[0.0, 0.0], [3.0, 1.0]]], dtype=DTYPE)
    weights = torch.tensor([[0.5, 0.5]], dtype=DTYPE)
    for dtype in (torch.float32, torch.float64):
        cloud = proportional_cloud(centres, [2, 2]).to(dtype).requires_grad_(True)
        energy_distance_per_set(cloud, centres, weights).sum().backward()
        assert torch.isfinite(cloud.grad).all()


# ---------------------------------------------------------------------------------------------
# Masks.


@pytest.mark.parametrize("junk", [float("nan"), 1e6])
def test_padding_with_junk_points_changes_nothing(junk: float) -> None:
    batch = make_batch(b=3, n=6, seed=10)
    pred = batch.points + 0.05
    padded, padded_pred = pad(batch, pred, extra=4, junk=junk)
    pairs = [
        (mse_per_set(pred, batch.target), mse_per_set(padded_pred, padded.target, padded.mask)),
        (energy_distance_per_set(pred, batch.centres, batch.weights),
         energy_distance_per_set(padded_pred, padded.centres, padded.weights, padded.mask)),
        (sinkhorn_per_set(pred, batch.centres, batch.weights, None, 0.1, 30),
         sinkhorn_per_set(padded_pred, padded.centres, padded.weights, padded.mask, 0.1, 30)),
    ]
    for plain, masked in pairs:
        torch.testing.assert_close(masked, plain)
    for kind in ("mse", "energy", "wasserstein"):
        config = LossConfig(type=kind)
        leaf = padded_pred.clone().requires_grad_(True)
        loss = compute_loss(config, leaf, padded)
        loss.backward()
        torch.testing.assert_close(loss, compute_loss(config, pred, batch))
        assert torch.isfinite(leaf.grad).all()
        assert torch.equal(leaf.grad[~padded.mask], torch.zeros_like(leaf.grad[~padded.mask]))


def test_ragged_sets_average_over_their_own_points() -> None:
    """Sets with different real counts in one batch equal each set computed alone."""
    batch = make_batch(b=3, n=8, seed=11)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    batch.mask = mask
    pred = batch.points + 0.1
    fns = [
        lambda p, c, w, m, t: mse_per_set(p, t, m),
        lambda p, c, w, m, t: energy_distance_per_set(p, c, w, m),
        lambda p, c, w, m, t: sinkhorn_per_set(p, c, w, m, 0.2, 30),
    ]
    target = batch.target
    for fn in fns:
        together = fn(pred, batch.centres, batch.weights, mask, target)
        for s in range(3):
            real = mask[s]
            alone = fn(pred[s:s + 1, real], batch.centres[s:s + 1], batch.weights[s:s + 1],
                       None, target[s:s + 1, real])
            torch.testing.assert_close(together[s:s + 1], alone)


def test_zero_weight_centres_are_ignored_wherever_they_sit() -> None:
    batch = make_batch(b=3, n=6, k=3, seed=12)  # last set: centre 2 has zero weight
    moved = batch.centres.clone()
    moved[-1, -1] = torch.tensor([50.0, -50.0], dtype=DTYPE)
    pred = batch.points
    for fn in (lambda c: energy_distance_per_set(pred, c, batch.weights),
               lambda c: sinkhorn_per_set(pred, c, batch.weights, None, 0.1, 30)):
        torch.testing.assert_close(fn(moved), fn(batch.centres))


def test_set_without_real_points_contributes_zero() -> None:
    batch = make_batch(b=2, n=4, seed=13)
    batch.mask = torch.tensor([[True, True, False, True], [False] * 4])
    pred = batch.points.clone().requires_grad_(True)
    for kind in ("mse", "energy", "wasserstein"):
        per_set = loss_per_set(LossConfig(type=kind), pred, batch)
        assert float(per_set[1].detach()) == 0.0
        per_set.sum().backward()
        assert torch.isfinite(pred.grad).all()
        pred.grad = None


# ---------------------------------------------------------------------------------------------
# Normalisation and the configured loss.


@pytest.mark.parametrize("kind", ["mse", "energy", "wasserstein"])
def test_normalizations_scale_as_specified(kind: str) -> None:
    batch = make_batch(b=4, seed=14)
    pred = batch.points
    raw = loss_per_set(LossConfig(type=kind, normalization="none"), pred, batch)
    sigma2 = batch.sigma.square()

    def norm(**kw) -> torch.Tensor:
        config = LossConfig(type=kind, **kw)
        return normalize_per_set(config, loss_per_set(config, pred, batch), batch)

    torch.testing.assert_close(norm(normalization="none"), raw)
    torch.testing.assert_close(norm(normalization="noise_var") * sigma2, raw)
    torch.testing.assert_close(norm(normalization="snr_power", snr_power_exponent=1.0),
                               norm(normalization="noise_var"))
    torch.testing.assert_close(norm(normalization="snr_power", snr_power_exponent=0.0),
                               raw / batch.signal_var)
    snr = 10.0 ** (batch.snr_db / 10.0)
    torch.testing.assert_close(norm(normalization="snr_power", snr_power_exponent=0.5),
                               raw / batch.signal_var * snr.sqrt())
    torch.testing.assert_close(norm(normalization="log", log_epsilon=1e-3),
                               torch.log(1e-3 + raw / sigma2))


@pytest.mark.parametrize("normalization", ["none", "noise_var", "snr_power", "log"])
def test_compute_loss_is_mean_of_normalized_per_set(normalization: str) -> None:
    batch = make_batch(b=4, seed=15)
    config = LossConfig(type="mse", normalization=normalization)
    pred = batch.points
    loss = compute_loss(config, pred, batch)
    assert loss.ndim == 0
    expected = normalize_per_set(config, mse_per_set(pred, batch.target), batch).mean()
    torch.testing.assert_close(loss, expected)


def test_wasserstein_epsilon_is_relative_to_sigma2() -> None:
    batch = make_batch(b=3, seed=16)
    config = LossConfig(type="wasserstein", normalization="none", sinkhorn_epsilon=0.2,
                        sinkhorn_iterations=25)
    expected = sinkhorn_per_set(batch.points, batch.centres, batch.weights, None,
                                0.2 * batch.sigma.square(), 25)
    torch.testing.assert_close(loss_per_set(config, batch.points, batch), expected)
    # Scaling the whole problem (points, centres, sigma) by c scales the loss by c^2.
    c = 3.0
    scaled = GMMBatch(points=c * batch.points, labels=batch.labels, centres=c * batch.centres,
                      weights=batch.weights, sigma=c * batch.sigma, snr_db=batch.snr_db,
                      k=batch.k)
    torch.testing.assert_close(loss_per_set(config, scaled.points, scaled), c * c * expected)


def test_low_precision_prediction_gives_float32_loss() -> None:
    batch = make_batch(b=2, seed=17)
    batch = GMMBatch(points=batch.points.float(), labels=batch.labels,
                     centres=batch.centres.float(), weights=batch.weights.float(),
                     sigma=batch.sigma.float(), snr_db=batch.snr_db.float(), k=batch.k)
    pred = batch.points.bfloat16().requires_grad_(True)
    for kind in ("mse", "energy", "wasserstein"):
        loss = compute_loss(LossConfig(type=kind), pred, batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert pred.grad is not None and pred.grad.dtype == torch.bfloat16
        pred.grad = None


def test_shape_errors() -> None:
    batch = make_batch(b=2, seed=18)
    with pytest.raises(ValueError, match="pred shape"):
        compute_loss(LossConfig(), batch.points[:, :3], batch)
    with pytest.raises(ValueError, match="mask"):
        mse_per_set(batch.points, batch.target, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_per_set(batch.points, batch.centres, batch.weights, None, 0.0)
