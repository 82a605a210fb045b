"""Tests of gmmt.evaluation.metrics: clustering scores against scikit-learn, distances against
brute force / linear programming, masking, gap closed and the breakdown helpers."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.metrics import (
    adjusted_rand_index,
    centre_mse_per_set,
    closest_centre_separation,
    energy_distance,
    entropic_wasserstein,
    gap_closed,
    induced_clusters,
    k_index,
    k_values,
    normalized_mutual_info,
    separation_bin_index,
    separation_bin_labels,
    snr_bin_index,
    snr_bin_labels,
    snr_bins,
)
from gmmt.training.losses import energy_distance_per_set

DTYPE = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_w2(x: np.ndarray, centres: np.ndarray, weights: np.ndarray) -> float:
    """Exact optimal transport cost (per coordinate) from uniform points to weighted centres."""
    n, k = len(x), len(centres)
    cost = ((x[:, None] - centres[None]) ** 2).sum(-1) / x.shape[1]
    rows = np.kron(np.eye(n), np.ones((1, k)))
    cols = np.kron(np.ones((1, n)), np.eye(k))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                  b_eq=np.r_[np.full(n, 1 / n), weights / weights.sum()], bounds=(0, None),
                  method="highs")
    return float(res.fun)


def random_labelings(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    g = gen(seed)
    classes = torch.randint(1, 6, (b, 1), generator=g)
    clusters = torch.randint(1, 6, (b, 1), generator=g)
    true = (torch.rand(b, n, generator=g) * classes).long()
    pred = (torch.rand(b, n, generator=g) * clusters).long()
    # Some pairs agree a lot (a noisy copy, relabelled), so high scores are tested too.
    copy = (true + 1) % 5
    noisy = torch.rand(b, n, generator=g) < 0.15
    pred[: b // 2] = torch.where(noisy, pred, copy)[: b // 2]
    mask = torch.rand(b, n, generator=g) < 0.8
    mask[:, 0] = True
    return true, pred, mask


def test_ari_and_nmi_equal_scikit_learn() -> None:
    true, pred, mask = random_labelings(40, 60, seed=1)
    ari = adjusted_rand_index(true, pred, mask)
    nmi = normalized_mutual_info(true, pred, mask)
    assert ari.dtype == torch.float64 and nmi.shape == (40,)
    for i in range(40):
        t, p = true[i][mask[i]].numpy(), pred[i][mask[i]].numpy()
        assert float(ari[i]) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
        assert float(nmi[i]) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)


@pytest.mark.parametrize("true, pred", [
    ([0, 0, 0, 0], [0, 0, 0, 0]),  # one cluster each: sklearn says 1
    ([0, 0, 0, 0], [0, 1, 2, 3]),  # all singletons against one cluster
    ([0, 1, 2, 3], [3, 2, 1, 0]),  # identical partitions, relabelled
    ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent: MI = 0
    ([0], [2]),  # a single point
])
def test_ari_and_nmi_edge_cases(true: list[int], pred: list[int]) -> None:
    t, p = torch.tensor([true]), torch.tensor([pred])
    assert float(adjusted_rand_index(t, p)[0]) == pytest.approx(adjusted_rand_score(true, pred))
    assert float(normalized_mutual_info(t, p)[0]) == pytest.approx(
        normalized_mutual_info_score(true, pred))


def test_energy_distance_matches_brute_force_and_the_training_loss() -> None:
    g = gen(2)
    pred = torch.randn(3, 7, 2, generator=g, dtype=DTYPE)
    centres = torch.randn(3, 3, 2, generator=g, dtype=DTYPE)
    weights = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]], dtype=DTYPE)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    value = energy_distance(pred, centres, weights, mask)
    for i in range(3):
        x = pred[i][mask[i]].numpy()
        w = weights[i].numpy()
        c = centres[i].numpy()
        xy = np.linalg.norm(x[:, None] - c[None], axis=-1) @ w / len(x)
        xx = np.linalg.norm(x[:, None] - x[None], axis=-1).mean()
        yy = w @ np.linalg.norm(c[:, None] - c[None], axis=-1) @ w
        assert float(value[i]) == pytest.approx(2 * xy.sum() - xx - yy, rel=1e-12)
    assert torch.allclose(value, energy_distance_per_set(pred, centres, weights, mask))
    # A cloud that is the weighted centres exactly scores 0.
    exact = centres[:1, [0, 1, 1]].clone()
    assert float(energy_distance(exact, centres[:1, :2], torch.tensor([[1 / 3, 2 / 3]],
                                                                      dtype=DTYPE))) < 1e-12


def test_wasserstein_matches_linear_programming() -> None:
    batch = validation_bank(DataConfig(sample_count_distribution=DistributionSpec(
        type="fixed", value=40)), 3, 6, 6, dtype=DTYPE)[0]
    noisy = batch.points
    clumped = batch.target + 0.02 * batch.sigma.view(-1, 1, 1)  # clumps with the label noise
    for pred in (noisy, clumped):
        value = entropic_wasserstein(pred, batch.centres, batch.weights, batch.sigma)
        for i in range(batch.num_sets):
            k = int(batch.k[i])
            exact = exact_w2(pred[i].numpy(), batch.centres[i, :k].numpy(),
                             batch.weights[i, :k].numpy())
            assert float(value[i]) == pytest.approx(exact, rel=2e-3)


def test_wasserstein_moves_mass_between_far_clumps() -> None:
    # Two clumps of predictions with masses 0.45 / 0.55 on centres weighted 0.5 / 0.5, far
    # apart relative to epsilon: 0.05 of the mass must cross, costing 0.05 * 4^2 / 2 = 0.4.
    # (A fixed budget of plain Sinkhorn iterations returns ~0 here.)
    centres = torch.tensor([[[-2.0, 0.0], [2.0, 0.0]]], dtype=DTYPE)
    pred = torch.cat([centres[:, :1].expand(1, 9, 2), centres[:, 1:].expand(1, 11, 2)], 1)
    value = entropic_wasserstein(pred, centres, torch.tensor([[0.5, 0.5]], dtype=DTYPE),
                                 torch.tensor([0.05], dtype=DTYPE))
    assert float(value[0]) == pytest.approx(0.4, rel=1e-3)


def test_every_metric_ignores_padding() -> None:
    batch = validation_bank(DataConfig(ragged=True), 4, 6, 6, dtype=DTYPE)[0]
    assert batch.mask is not None
    g = gen(4)
    pred = batch.target + 0.5 * batch.sigma.view(-1, 1, 1) * torch.randn(
        batch.points.shape, generator=g, dtype=DTYPE)
    junk = pred.masked_fill(~batch.mask.unsqueeze(-1), float("nan"))
    assignments = torch.randint(0, 4, batch.labels.shape, generator=g)
    full = {
        "mse": centre_mse_per_set(junk, batch.target, batch.mask),
        "ari": adjusted_rand_index(batch.labels, assignments, batch.mask),
        "nmi": normalized_mutual_info(batch.labels, assignments, batch.mask),
        "energy": energy_distance(junk, batch.centres, batch.weights, batch.mask),
        "wasserstein": entropic_wasserstein(junk, batch.centres, batch.weights, batch.sigma,
                                            batch.mask),
        "induced": induced_clusters(pred, batch.centres, batch.weights),
    }
    for i in range(batch.num_sets):
        n = int(batch.mask[i].sum())
        p, t, lab, a = pred[i:i + 1, :n], batch.target[i:i + 1, :n], batch.labels[i:i + 1, :n], \
            assignments[i:i + 1, :n]
        c, w, s = batch.centres[i:i + 1], batch.weights[i:i + 1], batch.sigma[i:i + 1]
        alone = {
            "mse": centre_mse_per_set(p, t),
            "ari": adjusted_rand_index(lab, a),
            "nmi": normalized_mutual_info(lab, a),
            "energy": energy_distance(p, c, w),
            "wasserstein": entropic_wasserstein(p, c, w, s),
        }
        for name, value in alone.items():
            # Wasserstein: equal to its solver's tolerance (a set may take extra Newton steps
            # while others in its batch converge).
            rel = 1e-6 if name == "wasserstein" else 1e-9
            assert float(full[name][i]) == pytest.approx(float(value[0]), rel=rel, abs=1e-12), \
                name
        assert torch.equal(full["induced"][i, :n], induced_clusters(p, c, w)[0])


def test_induced_clusters_pick_the_nearest_real_centre() -> None:
    centres = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.1, 0.0]]], dtype=DTYPE)
    weights = torch.tensor([[0.5, 0.5, 0.0]], dtype=DTYPE)  # the third is padding
    pred = torch.tensor([[[0.09, 0.0], [0.9, 0.2], [0.4, 0.0]]], dtype=DTYPE)
    assert induced_clusters(pred, centres, weights).tolist() == [[0, 1, 0]]


def test_gap_closed() -> None:
    assert gap_closed(0.5, 1.0, 0.0) == 0.5
    assert gap_closed(1.0, 1.0, 0.5) == 0.0
    assert gap_closed(2.0, 1.0, 0.5) == -2.0
    assert math.isnan(gap_closed(0.3, 0.5, 0.5))
    out = gap_closed(torch.tensor([0.5, 0.3]), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]))
    assert out[0] == 0.5 and torch.isnan(out[1])


def test_centre_mse_is_per_coordinate() -> None:
    pred = torch.zeros(2, 3, 4, dtype=DTYPE)
    target = torch.ones(2, 3, 4, dtype=DTYPE)
    target[1, 2] = 3.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert centre_mse_per_set(pred, target).tolist() == [1.0, 11 / 3]
    assert centre_mse_per_set(pred, target, mask).tolist() == [1.0, 1.0]


def test_snr_bins_and_k_values() -> None:
    easy = DistributionSpec(type="uniform", min=12, max=17)
    edges = snr_bins(easy, 5)
    assert snr_bin_labels(edges) == ["12_13", "13_14", "14_15", "15_16", "16_17"]
    snr = torch.tensor([12.0, 12.99, 13.0, 16.5, 17.0, 20.0, 5.0])
    assert snr_bin_index(snr, edges).tolist() == [0, 0, 1, 4, 4, 4, 0]
    wide = snr_bins(DistributionSpec(type="uniform", min=3, max=17), 5)
    assert snr_bin_labels(wide)[:2] == ["3_5.8", "5.8_8.6"]
    fixed = snr_bins(DistributionSpec(type="fixed", value=15), 5)
    assert snr_bin_labels(fixed) == ["15_15"] and snr_bin_index(snr, fixed).tolist() == [0] * 7
    normal = snr_bins(DistributionSpec(type="normal", mean=10, std=1), 2)
    assert normal == [(7.0, 10.0), (10.0, 13.0)]
    few = DistributionSpec(type="uniform", min=2, max=4)
    assert k_values(few) == [2, 3, 4]
    assert k_index(torch.tensor([2, 4, 3]), k_values(few)).tolist() == [0, 2, 1]
    assert k_values(DistributionSpec(type="choice", values=[3, 7])) == [3, 4, 5, 6, 7]


def test_closest_centre_separation_ignores_padded_components() -> None:
    # set 0: K=3 with its closest pair 1 apart; set 1: K=2, 5 apart, a padded row at distance 0
    centres = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [3.0, 1.0]],
                            [[0.0, 0.0], [0.0, 5.0], [0.0, 0.0]]])
    separation = closest_centre_separation(centres, torch.tensor([3, 2]), torch.tensor([0.5, 2.0]))
    assert separation.tolist() == [2.0, 2.5]
    assert separation_bin_labels() == ["0_3", "3_6", "6_12", "12_inf"]
    edges = torch.tensor([0.0, 2.99, 3.0, 5.9, 6.0, 11.9, 12.0, 100.0, math.inf])
    assert separation_bin_index(edges.double()).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_ari_of_a_generated_batch_is_one_for_the_truth() -> None:
    batch: GMMBatch = validation_bank(DataConfig(ragged=True), 5, 4, 4)[0]
    ones = adjusted_rand_index(batch.labels, batch.labels, batch.mask)
    assert torch.equal(ones, torch.ones(4, dtype=DTYPE))
    assert torch.allclose(normalized_mutual_info(batch.labels, batch.labels, batch.mask), ones)
