"""The model's own clustering: mean shift of the predicted centres (gmmt.evaluation.grouping)."""

import pytest
import torch

from gmmt.data.gmm import GMMSampler
from gmmt.evaluation.baselines import oracle_posterior_mean
from gmmt.evaluation.grouping import group_predictions
from gmmt.evaluation.held_out import preset_data

CENTRES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
SIZES = (50, 30, 20)  # distinct, so labels numbered by size are the true labels


def collapsed_set(sizes: tuple[int, ...] = SIZES, jitter: float = 0.0, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points [n, 2], predictions [n, 2], true labels [n]): unit noise around CENTRES, each
    prediction its cluster's centre (plus ``jitter`` times unit noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    centre = CENTRES[labels]
    points = centre + torch.randn(len(labels), 2, generator=g)
    pred = centre + jitter * torch.randn(len(labels), 2, generator=g)
    return points, pred, labels


def test_collapsed_clusters_give_exact_k_labels_and_centres() -> None:
    points, pred, labels = collapsed_set()
    g = group_predictions(pred[None], points[None])
    assert g.k_hat.tolist() == [3]
    assert torch.equal(g.labels[0], labels)  # numbered by decreasing size
    assert torch.allclose(g.centres[0], CENTRES[labels])
    assert g.labels.dtype == g.k_hat.dtype == torch.long


def test_posterior_mean_like_blobs_with_jitter() -> None:
    # two well separated blobs, predictions scattered a little around each centre
    points, pred, labels = collapsed_set(sizes=(70, 40), jitter=0.05, seed=1)
    g = group_predictions(pred[None], points[None])
    assert g.k_hat.tolist() == [2]
    assert torch.equal(g.labels[0], labels)
    for k in range(2):  # each group's centre is the mean of its predictions
        assert torch.allclose(g.centres[0][labels == k], pred[labels == k].mean(0), atol=1e-5)


def test_a_stray_prediction_joins_a_group_instead_of_forming_one() -> None:
    points, pred, labels = collapsed_set()
    pred[0] = torch.tensor([4.0, 0.0])  # stopped between clusters 0 and 1, nearer 0
    g = group_predictions(pred[None], points[None])
    assert g.k_hat.tolist() == [3]
    assert torch.equal(g.labels[0], labels)


def test_one_cluster_is_one_group() -> None:
    points, pred, _ = collapsed_set(sizes=(60,), jitter=0.05)
    g = group_predictions(pred[None], points[None])
    assert g.k_hat.tolist() == [1]
    assert not g.labels.any()


def test_all_groups_tiny_become_one_group() -> None:
    # the identity's predictions: zero residual, so each point is its own (tiny) group
    points, _, _ = collapsed_set()
    g = group_predictions(points[None], points[None])
    assert g.k_hat.tolist() == [1]
    assert torch.allclose(g.centres[0], points.mean(0).expand_as(points), atol=1e-5)


def test_min_size_decides_what_counts_as_a_group() -> None:
    points, pred, _ = collapsed_set()
    assert group_predictions(pred[None], points[None], min_size=21).k_hat.tolist() == [2]
    g = group_predictions(pred[None], points[None], min_size=31)
    assert g.k_hat.tolist() == [1] and not g.labels.any()
    assert group_predictions(pred[None], points[None], min_size=1).k_hat.tolist() == [3]


def test_padded_points_are_ignored_and_change_nothing() -> None:
    points, pred, _ = collapsed_set(jitter=0.05)
    alone = group_predictions(pred[None], points[None])
    n = len(points)
    # the same set padded with garbage, beside a second set of other sizes
    padded_points = torch.cat([points, torch.full((7, 2), float("nan"))])
    padded_pred = torch.cat([pred, torch.full((7, 2), 1e9)])
    other_points, other_pred, other_labels = collapsed_set(sizes=(80, 27), jitter=0.05, seed=3)
    batch_points = torch.stack([padded_points, other_points])
    batch_pred = torch.stack([padded_pred, other_pred])
    mask = torch.ones(2, n + 7, dtype=torch.bool)
    mask[0, n:] = False
    g = group_predictions(batch_pred, batch_points, mask)
    assert g.k_hat.tolist() == [3, 2]
    assert torch.equal(g.labels[0, :n], alone.labels[0])
    assert torch.allclose(g.centres[0, :n], alone.centres[0])
    assert not g.labels[0, n:].any() and not g.centres[0, n:].any()
    assert torch.equal(g.labels[1], other_labels)


def test_a_set_without_real_points_has_no_group() -> None:
    points, pred, _ = collapsed_set()
    mask = torch.ones(2, len(points), dtype=torch.bool)
    mask[1] = False
    g = group_predictions(torch.stack([pred, pred]), torch.stack([points, points]), mask)
    assert g.k_hat.tolist() == [3, 0]
    assert not g.labels[1].any() and not g.centres[1].any()
    none = group_predictions(pred[None], points[None], torch.zeros(1, len(points), dtype=bool))
    assert none.k_hat.tolist() == [0]


@pytest.mark.parametrize(("scale", "shift"), [(1e-3, -5.0), (1e3, 1e4), (1.0, 1e6)])
def test_invariant_to_scale_and_translation(scale: float, shift: float) -> None:
    points, pred, _ = collapsed_set(jitter=0.1)
    points, pred = points.double(), pred.double()
    pred[1] = torch.tensor([4.5, 5.0])  # a stray, for good measure
    g = group_predictions(pred[None], points[None])
    moved = group_predictions(pred[None] * scale + shift, points[None] * scale + shift)
    assert torch.equal(moved.k_hat, g.k_hat)
    assert torch.equal(moved.labels, g.labels)
    assert torch.allclose(moved.centres, g.centres * scale + shift, rtol=1e-9,
                          atol=1e-9 * (abs(shift) + scale))


def test_point_order_does_not_matter() -> None:
    points, pred, _ = collapsed_set(jitter=0.1)
    perm = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))
    g = group_predictions(pred[None], points[None])
    p = group_predictions(pred[None, perm], points[None, perm])
    assert torch.equal(p.labels[0], g.labels[0, perm])
    assert torch.allclose(p.centres[0], g.centres[0, perm])


def test_finds_k_from_posterior_means_of_the_simple_prior() -> None:
    # the oracle's posterior means stand in for a well trained model: not every set (two
    # overlapping clusters can form one mode, or leave a few ambiguous points between them),
    # but most
    batch = GMMSampler(preset_data("simple"), 0, "cpu").batch(0, 64, rank=0, stream="test")
    pred = oracle_posterior_mean(batch.points, batch.centres, batch.weights, batch.sigma,
                                 batch.mask).centres.float()
    g = group_predictions(pred, batch.points, batch.mask)
    k = (batch.weights > 0).sum(1)
    assert (g.k_hat == k).float().mean() >= 0.85


def test_bad_arguments() -> None:
    points, pred, _ = collapsed_set()
    with pytest.raises(ValueError, match="pred and points"):
        group_predictions(pred, points)
    with pytest.raises(ValueError, match="mask"):
        group_predictions(pred[None], points[None], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bandwidth"):
        group_predictions(pred[None], points[None], bandwidth=0)
    with pytest.raises(ValueError, match="min_size"):
        group_predictions(pred[None], points[None], min_size=0)
