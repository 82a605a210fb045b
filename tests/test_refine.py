"""The count head (P(K | points)) and amortized + refined inference (EM from the model's
clusters), in validation, gmmt.evaluate and gmmt.predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_config

import gmmt
from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.config.model import ModelConfig, RefinementConfig
from gmmt.config.validation import ValidationConfig
from gmmt.data.gmm import GMMSampler
from gmmt.evaluation.baselines import fit_em, fit_kmeans
from gmmt.evaluation.metrics import adjusted_rand_index, centre_mse_per_set
from gmmt.evaluation.refine import MIN_PROBABILITY, refine, refine_unknown_k
from gmmt.evaluation.validate import layout, summarise, validation_sums
from gmmt.model.build import build_model
from gmmt.training.experiment import ExperimentManager
from gmmt.training.losses import count_loss


def count_model(k_max: int = 5) -> torch.nn.Module:
    config = ModelConfig()
    config.transformer.hidden_dim, config.transformer.num_layers = 16, 2
    config.count_head.enabled = True
    return build_model(config, 2, k_max).eval()


def separated(num_sets: int = 16, seed: int = 0, snr: float = 25.0, k: int = 3):
    """Sets of well separated clusters (25 dB), 120 points each."""
    data = DataConfig(cluster_params=DistributionSpec(type="fixed", value=k),
                      snr_db_params=DistributionSpec(type="fixed", value=snr),
                      sample_count_distribution=DistributionSpec(type="fixed", value=120))
    return GMMSampler(data, seed).batch(0, num_sets)


# --- the count head ---------------------------------------------------------------------------


def test_count_head_gives_a_distribution_over_k_invariant_to_order_and_padding() -> None:
    model = count_model(k_max=5)
    points = torch.randn(3, 30, 2)
    probs = model.count_probabilities(points)
    assert probs.shape == (3, 5) and torch.allclose(probs.sum(-1), torch.ones(3))
    order = torch.randperm(30)
    assert torch.allclose(model.count_probabilities(points[:, order]), probs, atol=1e-5)
    padded = torch.cat([points, torch.full((3, 7, 2), 1e3)], 1)  # junk where the mask is False
    mask = torch.arange(37) < 30
    assert torch.allclose(model.count_probabilities(padded, mask.expand(3, -1)), probs,
                          atol=1e-5)
    # no head: no probabilities, and the centres are the same call either way
    assert build_model(ModelConfig(), 2).count_head is None


def test_count_head_needs_the_priors_k_max() -> None:
    config = ModelConfig()
    config.count_head.enabled = True
    with pytest.raises(ValueError, match="max_components"):
        build_model(config, 2)


def test_count_loss_is_the_cross_entropy_against_the_true_k() -> None:
    logits = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    right, wrong = torch.tensor([2, 3]), torch.tensor([1, 1])
    assert count_loss(logits, right) < 1e-3 < 5 < count_loss(logits, wrong)


def test_count_head_learns_to_tell_two_from_four_clusters() -> None:
    torch.manual_seed(0)
    model = count_model(k_max=4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = separated(16, seed=step, k=2 if step % 2 else 4)
        _, aux = model(batch.points, return_aux=True)
        loss = count_loss(aux.count_logits, batch.k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = [separated(32, seed=1000 + k, k=k) for k in (2, 4)]
    right = [(model.count_probabilities(b.points).argmax(-1) + 1 == b.k).float().mean()
             for b in test]
    assert min(right) > 0.75, right  # chance is 0.5; some 4-centre sets hold two close ones


# --- refinement -------------------------------------------------------------------------------


def test_refining_a_perfect_prediction_gives_the_tied_em_fit_from_the_true_clusters() -> None:
    batch = separated()
    result = refine(batch.points, batch.target, batch.k, iterations=20)
    assert torch.equal(result.k_hat, batch.k)
    assert adjusted_rand_index(batch.labels, result.assignments).min() > 0.99
    # the same as EM started from the true centres (k-means on exact centres finds them)
    fit = fit_em(batch.points, batch.k, seeds=batch.centres, max_iter=20, tol=1e-6, tied=True)
    assert torch.allclose(result.centres, fit.result().centres.float(), atol=1e-5)


def test_refinement_repairs_a_poor_prediction() -> None:
    batch = separated(snr=20.0)
    rough = batch.target + 0.3 * batch.sigma.view(-1, 1, 1) * torch.randn_like(batch.points)
    refined = refine(batch.points, rough, batch.k, iterations=20).centres
    before = centre_mse_per_set(rough, batch.target).mean()
    after = centre_mse_per_set(refined, batch.target).mean()
    assert after < 0.5 * before


def test_not_told_k_weighs_each_likely_k_by_the_head_and_the_fits_bic() -> None:
    batch = separated(8)
    k_max, d = 5, 2
    one_hot = torch.nn.functional.one_hot(batch.k - 1, k_max).double()
    told = refine(batch.points, batch.target, batch.k, iterations=10)
    sure = refine_unknown_k(batch.points, batch.target, one_hot, iterations=10)
    assert torch.allclose(sure.centres, told.centres) and torch.equal(sure.k_hat, batch.k)
    # a K below MIN_PROBABILITY is not refined at all
    faint = 0.995 * one_hot + 0.005 * torch.nn.functional.one_hot(batch.k, k_max).double()
    assert MIN_PROBABILITY > 0.005
    assert torch.allclose(refine_unknown_k(batch.points, batch.target, faint,
                                           iterations=10).centres,
                          0.995 * told.centres + 0.005 * batch.target)
    # The head leans to K + 1 (0.6), but clear clusters: the fits' BIC picks the true K; the
    # head's doubt (0.6) keeps 40 % of the model's own answer.
    leaning = 0.4 * one_hot + 0.6 * torch.nn.functional.one_hot(batch.k, k_max).double()
    clear = refine_unknown_k(batch.points, batch.target, leaning, iterations=10)
    assert torch.equal(clear.k_hat, batch.k)
    assert torch.allclose(clear.centres, 0.6 * told.centres + 0.4 * batch.target, atol=1e-4)
    # Overlapping clusters: the weights are P_head(K) exp(-BIC_K / 2), normalised.
    blurred = separated(4, seed=3, snr=6.0)
    pred = blurred.target
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]]).repeat(4, 1)
    result = refine_unknown_k(blurred.points, pred, probs, iterations=10)
    n = torch.tensor(120.0, dtype=torch.float64)
    log_w, centres = [], []
    for k in (2, 3):
        kk = torch.full((4,), k)
        seeds = fit_kmeans(pred, kk).centroids
        fit = fit_em(blurred.points, kk, seeds=seeds, max_iter=10, tol=1e-6, tied=True)
        bic = -2 * fit.log_likelihood * n + (k * d + k) * n.log()
        log_w.append(torch.tensor(0.5, dtype=torch.float64).log() - 0.5 * bic)
        centres.append(fit.result().centres.float())
    w = torch.softmax(torch.stack(log_w, 1), 1).float()
    averaged = w[:, :1, None] * centres[0] + w[:, 1:, None] * centres[1]
    assert torch.allclose(result.centres, 0.5 * averaged + 0.5 * pred, atol=1e-5)
    assert torch.equal(result.k_hat, w.argmax(1) + 2)


def test_validation_scores_the_refined_model_beside_the_raw_one() -> None:
    model = count_model(k_max=4)
    data = DataConfig(sample_count_distribution=DistributionSpec(type="fixed", value=60))
    batches = [GMMSampler(data, 0).batch(i, 8) for i in range(2)]
    config = ValidationConfig(metrics=["mse", "k_accuracy", "ari"],
                              baselines=["em_tied", "em_bic"])
    shape = layout(config, data, refined=True)
    assert shape.methods == ("model", "refined", "refined_told_k", "em_tied", "em_bic")
    assert shape.method_metrics("refined") == ["mse", "k_accuracy", "ari"]
    assert shape.method_metrics("refined_told_k") == ["mse", "ari"]  # told K: no K accuracy
    sums = validation_sums(model, batches, config, data, refinement=RefinementConfig(
        enabled=True, iterations=5))
    results = summarise(sums, shape)
    # an untrained model's K is poor, but the refined fit told K is as good as tied EM's
    assert results.overall["refined_told_k"]["mse"] < 2 * results.overall["em_tied"]["mse"]
    assert 0 <= results.overall["refined"]["k_accuracy"] <= 1
    assert layout(config, data) == layout(config, data, refined=False)
    assert "refined" not in summarise(validation_sums(model, batches, config, data),
                                      layout(config, data)).overall


# --- gmmt.evaluate and gmmt.predict -----------------------------------------------------------


@pytest.fixture(scope="module")
def count_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    config = small_config(base, "model.count_head.enabled=true")
    return Path(ExperimentManager(config).run()["run_dir"])


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmmt.evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_evaluate_refine_scores_both_refined_methods(count_run: Path, tmp_path: Path) -> None:
    done = evaluate(count_run, "--num-sets", "8", "--baselines", "em_tied", "--refine", "3",
                    "--out", tmp_path / "ev", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["refine_iterations"] == 3
    assert {"refined", "refined_told_k", "em_tied"} == set(result["baselines"])
    assert "k_accuracy" in result["baselines"]["refined"]
    # the run's own setting (off) without --refine
    plain = json.loads(evaluate(count_run, "--num-sets", "8", "--baselines", "em_tied",
                                "--out", tmp_path / "plain", "--json").stdout)
    assert plain["refine_iterations"] == 0 and set(plain["baselines"]) == {"em_tied"}


def test_evaluate_refuses_a_negative_refine(count_run: Path, tmp_path: Path) -> None:
    done = evaluate(count_run, "--refine", "-1", "--out", tmp_path / "ev")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gmmt.evaluate: --refine must be >= 0 (0: no refinement), got -1"]
    assert not (tmp_path / "ev").exists()


def blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    return np.concatenate([c + rng.normal(size=(m, 2)) for c, m in zip(centres, (40, 30, 20))])


def test_predict_refined_blends_the_fitted_mixture_with_the_model(count_run: Path) -> None:
    points = blobs()
    raw = gmmt.predict(count_run, points, refine=0)
    assert raw.refine_iterations == 0 and torch.equal(raw.centres, raw.raw_centres)
    assert raw.count_probabilities.shape == (4,)  # K = 1..4 of quick_test's prior
    refined = gmmt.predict(count_run, points, refine=20)
    assert refined.refine_iterations == 20
    assert torch.equal(refined.raw_centres, raw.centres)
    # a 4-step model's head is unsure; the refined fits' BIC finds the three clear blobs
    assert refined.k_hat == 3 and set(refined.labels.tolist()) == {0, 1, 2}
    truth = np.repeat(np.arange(3), (40, 30, 20))
    assert np.array_equal(refined.labels.numpy(), truth)  # 0 = the largest group
    means = np.stack([points[truth == g].mean(0) for g in range(3)])
    # the blobs' means (up to the small weight BIC leaves on K = 4; the noise is 1 here),
    # counted as far as the head is sure of its K; the rest is the model's own answer
    confidence = float(refined.count_probabilities.max())
    assert confidence < 0.9
    expected = confidence * means[truth] + (1 - confidence) * raw.centres.numpy()
    assert np.allclose(refined.centres.numpy(), expected, atol=1e-2)
    with pytest.raises(ValueError, match="refine must be >= 0"):
        gmmt.predict(count_run, points, refine=-2)


def test_predict_refined_on_three_blobs_with_the_true_k(tmp_path: Path) -> None:
    """A model without a count head groups its predictions for K; refined with three clear
    blobs, every point's centre is its blob's sample mean."""
    run = Path(ExperimentManager(small_config(tmp_path)).run()["run_dir"])
    points = blobs()
    result = gmmt.predict(run, points, refine=20)
    if result.k_hat == 3:  # the grouping of a 4-step model may miss: refine told K below
        truth = np.repeat(np.arange(3), (40, 30, 20))
        means = np.stack([points[truth == g].mean(0) for g in range(3)])
        assert np.allclose(result.centres.numpy(), means[truth], atol=1e-3)
    fit = refine(torch.from_numpy(points)[None].float(), result.raw_centres[None],
                 torch.tensor([3]), iterations=20)
    truth = np.repeat(np.arange(3), (40, 30, 20))
    means = np.stack([points[truth == g].mean(0) for g in range(3)])
    assert np.allclose(fit.centres[0].numpy(), means[truth], atol=1e-3)


def test_predict_cli_refine(count_run: Path, tmp_path: Path) -> None:
    file = tmp_path / "points.npy"
    np.save(file, blobs())
    done = subprocess.run([sys.executable, "-m", "gmmt.predict", str(count_run), str(file),
                           "--refine", "20", "--out", str(tmp_path / "out.csv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refined by up to 20 EM iterations" in done.stderr
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + len(blobs())


def test_predict_cli_refine_with_a_plot_and_a_bad_refine(count_run: Path, tmp_path: Path) -> None:
    file = tmp_path / "points.npy"
    np.save(file, blobs())
    done = subprocess.run([sys.executable, "-m", "gmmt.predict", str(count_run), str(file),
                           "--refine", "20", "--plot", str(tmp_path / "g.png"), "--out",
                           str(tmp_path / "g.csv")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "gmmt.predict", str(count_run), str(file),
                          "--refine", "-1", "--out", str(tmp_path / "bad.csv")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "refine must be >= 0" in bad.stderr and not (tmp_path / "bad.csv").exists()


def test_refined_labels_are_numbered_by_size_even_when_a_component_is_left_empty(
        count_run: Path) -> None:
    """A head sure of more components than the points fill: every label names a group that
    holds points, 0 the largest, and k_hat counts them."""
    model = gmmt.load_model(count_run)
    points = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0]])
    result = gmmt.predict(model, points, refine=5)
    sizes = torch.bincount(result.labels)
    assert result.k_hat == len(sizes) and (sizes > 0).all()
    assert torch.equal(sizes, sizes.sort(descending=True).values)


def test_refinement_is_the_same_with_padding_and_without_points() -> None:
    batch = separated(2)
    probs = torch.nn.functional.one_hot(batch.k - 1, 5).double() * 0.6 + 0.1
    full = refine_unknown_k(batch.points, batch.target, probs, iterations=10,
                            generator=torch.Generator().manual_seed(0))
    padded_points = torch.cat([batch.points, torch.zeros(2, 10, 2)], 1)
    padded_pred = torch.cat([batch.target, torch.zeros(2, 10, 2)], 1)
    mask = torch.arange(130) < 120
    padded = refine_unknown_k(padded_points, padded_pred, probs, mask.expand(2, -1),
                              iterations=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(padded.centres[:, :120], full.centres, atol=1e-5)
    assert (padded.centres[:, 120:] == 0).all()
    # whatever the model answers at padded points stays out of the blend
    noisy_pred = torch.cat([batch.target, torch.ones(2, 10, 2)], 1)
    noisy = refine_unknown_k(padded_points, noisy_pred, probs, mask.expand(2, -1),
                             iterations=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy.centres, padded.centres)
    # a set without real points gets finite (zero) centres, not NaN
    empty = torch.zeros(2, 130, dtype=torch.bool)
    empty[0] = mask
    result = refine_unknown_k(padded_points, padded_pred, probs, empty, iterations=5)
    assert torch.isfinite(result.centres).all() and (result.centres[1] == 0).all()
