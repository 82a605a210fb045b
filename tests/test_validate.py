"""gmmt.evaluation.validate and results: sum layout, breakdowns, derived metrics, determinism."""

import json
import math

import pytest
import torch
from torch import nn

from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.config.validation import BreakdownConfig, EMConfig, ValidationConfig
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.report import markdown
from gmmt.evaluation.results import Results, bin_edges
from gmmt.evaluation.validate import Layout, layout, summarise, validation_sums

ALL_METRICS = ["mse", "mse_over_noise", "reachable_gap", "gap_closed", "ari", "nmi",
               "k_accuracy", "induced_ari", "induced_nmi", "energy", "wasserstein"]
# Every baseline but the Bayes floor, whose cost has its own tests (test_bayes.py, below).
ALL_BASELINES = ["identity", "oracle", "em_tied", "em", "em_bic", "kmeans"]


class Identity(nn.Module):
    """A 'model' that returns the points: its metrics must equal the identity baseline's."""

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None,
                snr_db: torch.Tensor) -> torch.Tensor:
        return points


class Shrink(nn.Module):
    """Pulls every point halfway to its set mean: a fixed, imperfect denoiser."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None,
                snr_db: torch.Tensor) -> torch.Tensor:
        return points.mean(1, keepdim=True) + self.scale * (points - points.mean(1, keepdim=True))


def full_config(**breakdown) -> ValidationConfig:
    return ValidationConfig(metrics=list(ALL_METRICS), baselines=list(ALL_BASELINES),
                            em=EMConfig(n_init=2, max_iter=50),
                            breakdown=BreakdownConfig(**breakdown))


@pytest.fixture(scope="module")
def data() -> DataConfig:
    return DataConfig(ragged=True,
                      sample_count_distribution=DistributionSpec(type="uniform", min=40, max=120))


@pytest.fixture(scope="module")
def bank(data: DataConfig) -> list:
    return validation_bank(data, 0, 40, 16)


FULL = {"by_snr": True, "by_k": True, "by_separation": True}


@pytest.fixture(scope="module")
def shape(data: DataConfig) -> Layout:
    return layout(full_config(**FULL), data)


@pytest.fixture(scope="module")
def sums(data: DataConfig, bank: list) -> torch.Tensor:
    return validation_sums(Identity(), bank, full_config(**FULL), data, 3)


def test_sums_follow_the_layout(shape: Layout, sums: torch.Tensor) -> None:
    assert sums.shape == shape.shape and sums.dtype == torch.float64
    assert shape.groups[0] == ("all", "")
    for group in (("by_snr", "12_13"), ("by_snr", "16_17"), ("by_k", "4"), ("by_sep", "0_3"),
                  ("by_sep", "12_inf")):
        assert group in shape.groups
    assert len(set(shape.groups)) == len(shape.groups)
    assert shape.methods == ("model", *ALL_BASELINES)
    assert shape.metrics[:2] == ("mse", "mse_over_noise")
    assert not {"gap_closed", "reachable_gap"} & set(shape.metrics)  # derived, never summed
    # Only the methods that choose K have a K accuracy; the truth-induced clusters are the
    # model's only.
    assert [m for m, metric in shape.columns if metric == "k_accuracy"] == ["model", "em_bic"]
    assert [m for m, metric in shape.columns if metric == "induced_ari"] == ["model"]
    assert float(sums[0, 0]) == 40  # every set is in the first group


def test_summarise_covers_every_group_and_derives_gap_closed(shape: Layout,
                                                             sums: torch.Tensor) -> None:
    results = summarise(sums, shape)
    nonempty = [g for g, row in zip(shape.groups, sums) if float(row[0]) > 0]
    assert sum(len(bins) for bins in results.breakdowns.values()) == len(nonempty) - 1
    every_group = [results.overall] + [scores for bins in results.breakdowns.values()
                                       for scores in bins.values()]
    for scores in every_group:
        assert list(scores) == list(shape.methods)
        assert list(scores["model"]) == ["mse", "gap_closed", *shape.method_metrics("model")[1:]]
        for method in shape.methods[1:]:
            assert list(scores[method]) == shape.method_metrics(method)
    overall = results.overall
    assert overall["model"]["gap_closed"] == pytest.approx(
        (overall["em"]["mse"] - overall["model"]["mse"])
        / (overall["em"]["mse"] - overall["oracle"]["mse"]))
    assert overall["model"]["mse"] == pytest.approx(
        float(sums[0, shape.column("model", "mse")]) / 40)
    counts = {(kind, label) for kind, bins in results.counts.items() for label in bins}
    assert counts == set(nonempty[1:])


def test_results_flatten_for_trackers_and_round_trip_through_json(
        shape: Layout, sums: torch.Tensor) -> None:
    results = summarise(sums, shape)
    flat = results.flat()
    assert flat["mse"] == results.model["mse"]
    assert flat["baselines.em.ari"] == results.overall["em"]["ari"]
    label = next(iter(results.breakdowns["by_sep"]))
    assert (flat[f"by_sep.{label}.baselines.oracle.mse"]
            == results.breakdowns["by_sep"][label]["oracle"]["mse"])
    saved = json.loads(json.dumps(results.to_json()))  # as summary.json holds it
    assert saved["model"] == results.model and set(saved["baselines"]) == set(ALL_BASELINES)
    assert sum(saved["sets_per_bin"]["by_k"].values()) == 40
    assert Results.from_json(saved) == results
    assert Results.from_json({}) == Results({})


def test_markdown_report_orders_bins_by_value() -> None:
    scores = {"model": {"mse": 0.1, "mse_over_noise": 0.5}, "em": {"mse_over_noise": 0.25}}
    results = Results({"model": {"mse": 0.1, "gap_closed": 0.3}},
                      {"by_k": {"10": scores, "2": scores, "3": scores}},
                      {"by_k": {"10": 1, "2": 5, "3": 4}})
    text = markdown(results, "title", "one line")
    assert text.startswith("## title\n\none line\n")
    assert "| model | the points only | 0.1 |" in text and "model gap closed: 0.3 (" in text
    k_rows = [line for line in text.splitlines() if line.startswith(("| 2 ", "| 3 ", "| 10 "))]
    assert k_rows == ["| 2 | 5 | 0.5 | 0.25 |", "| 3 | 4 | 0.5 | 0.25 |",
                      "| 10 | 1 | 0.5 | 0.25 |"]
    assert "| K | sets | model | em |" in text and "by SNR" not in text


def test_bin_labels_parse_to_edges() -> None:
    assert bin_edges("-2_3.5") == (-2.0, 3.5) and bin_edges("12_inf") == (12.0, math.inf)
    assert bin_edges("4") == (4.0, 4.0)
    for bad in ("1_2_3", "nan_2", "low_high", ""):
        assert bin_edges(bad) is None, bad


def test_breakdowns_sum_back_to_the_totals(shape: Layout, sums: torch.Tensor) -> None:
    for kind, bins in (("by_snr", 5), ("by_k", 3), ("by_sep", 4)):
        rows = [i for i, (k, _) in enumerate(shape.groups) if k == kind]
        assert len(rows) == bins
        torch.testing.assert_close(sums[rows].sum(0), sums[0], rtol=1e-12, atol=1e-12)


def test_identity_model_scores_like_the_identity_baseline(shape: Layout,
                                                          sums: torch.Tensor) -> None:
    pairs = [(m, m) for m in ("mse", "mse_over_noise", "energy", "wasserstein")]
    # The identity baseline's assignment is each point's nearest true centre: the clusters the
    # truth induces on the identity model's predictions.
    pairs += [("induced_ari", "ari"), ("induced_nmi", "nmi")]
    for model_metric, baseline_metric in pairs:
        torch.testing.assert_close(sums[:, shape.column("model", model_metric)],
                                   sums[:, shape.column("identity", baseline_metric)],
                                   rtol=1e-12, atol=0), model_metric
    overall = summarise(sums, shape).overall
    assert overall["model"]["mse_over_noise"] == pytest.approx(1.0, abs=0.1)  # MSE ~ sigma^2
    assert overall["oracle"]["mse"] < overall["em"]["mse"] < overall["model"]["mse"]
    assert 0.0 < overall["em"]["ari"] <= 1.0


def test_only_what_the_config_asks_for(data: DataConfig, bank: list) -> None:
    minimal = ValidationConfig(metrics=["mse"], baselines=[])
    assert layout(minimal, data) == Layout((("all", ""),), ("model",), ("mse",))
    sums = validation_sums(Identity(), bank[:1], minimal, data)
    assert sums.shape == (1, 2)
    results = summarise(sums, layout(minimal, data))
    assert list(results.overall) == ["model"] and list(results.model) == ["mse"]
    assert results.breakdowns == {}
    gap_only = layout(ValidationConfig(metrics=["gap_closed", "ari"],
                                       baselines=["oracle", "em"]), data)
    assert gap_only.methods == ("model", "oracle", "em") and gap_only.metrics == ("mse", "ari")


def test_deterministic_and_restores_the_model_mode(data: DataConfig, bank: list) -> None:
    config = ValidationConfig(metrics=["mse", "ari"], baselines=["em", "kmeans"])
    model = Shrink().train()
    first = validation_sums(model, bank, config, data, generator_seed=7)
    assert model.training
    second = validation_sums(model.eval(), bank, config, data, generator_seed=7)
    assert not model.training
    assert torch.equal(first, second) and not first.requires_grad


def test_empty_groups_are_left_out_of_the_results(bank: list) -> None:
    wide = DataConfig(snr_db_params=DistributionSpec(type="uniform", min=2, max=17),
                      cluster_params=DistributionSpec(type="uniform", min=2, max=6))
    config = ValidationConfig(metrics=["mse"], baselines=["oracle"],
                              breakdown=BreakdownConfig(by_snr=True, snr_bins=3, by_k=True))
    shape = layout(config, wide)
    sums = validation_sums(Identity(), bank[:1], config, wide)
    for group in (("by_snr", "2_7"), ("by_k", "6")):
        assert float(sums[shape.groups.index(group), 0]) == 0
    results = summarise(sums, shape)
    assert "2_7" not in results.breakdowns["by_snr"] and "6" not in results.breakdowns["by_k"]
    assert "12_17" in results.breakdowns["by_snr"]
    assert not math.isnan(results.breakdowns["by_k"]["2"]["model"]["mse"])


def test_baseline_cache_gives_identical_sums_without_recomputing(monkeypatch) -> None:
    import gmmt.evaluation.validate as validate
    from gmmt.config.presets import resolve_config
    from gmmt.model.build import build_model

    cfg = resolve_config("quick_test", validation="comprehensive", overrides=[
        'data.sample_count_distribution={"type": "fixed", "value": 40}']).config
    bank = validation_bank(cfg.data, 0, 8, 4)
    model = build_model(cfg.model, cfg.data.dim, cfg.data.max_clusters)
    fresh = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0)
    cache: dict = {}
    first = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0, cache)
    calls = []
    monkeypatch.setattr(validate, "run_baseline", lambda *a, **k: calls.append(a))
    second = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0, cache)
    assert not calls  # every baseline came from the cache
    assert len(cache) == len(bank) * len(cfg.validation.baselines)
    assert torch.equal(fresh, first) and torch.equal(first, second)


def test_markdown_report_shows_the_floor_and_what_each_method_is_told() -> None:
    overall = {"model": {"mse": 0.0011, "excess_over_bayes": 0.05, "reachable_gap": 0.4,
                         "k_accuracy": 0.9},
               "bayes": {"mse": 0.00105, "unconverged": 0.25},
               "em_tied": {"mse": 0.00111, "excess_over_bayes": 0.057},
               "em_bic": {"mse": 0.00112, "excess_over_bayes": 0.067, "k_accuracy": 0.95}}
    text = markdown(Results(overall, num_sets=8), "t", "d")
    assert "| bayes | K, σ and the prior (the floor) | 0.00105 | — | — |" in text
    assert "| model | the points only | 0.0011 | +5.0 % | 0.9 |" in text
    assert "| em_bic | K ≤ K_max; chooses K | 0.00112 | +6.7 % | 0.95 |" in text
    assert "model reachable gap: 0.4" in text
    assert "the Gibbs chains disagree on 2 of 8 sets" in text


def test_floor_gaps_are_derived_from_the_averaged_errors() -> None:
    shape = Layout((("all", ""), ("by_k", "2"), ("by_k", "3")),
                   ("model", "bayes", "em_tied", "oracle"), ("mse",))
    # counts, then the MSE sums of model, bayes, em_tied, oracle; the K = 3 bin has no sets.
    sums = torch.tensor([[4.0, 4 * 1.10, 4 * 1.00, 4 * 1.20, 4 * 0.7],
                         [4.0, 4 * 1.10, 4 * 1.00, 4 * 1.20, 4 * 0.7],
                         [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    results = summarise(sums, shape)
    model = results.model
    assert list(model) == ["mse", "excess_over_bayes", "reachable_gap"]  # no EM: no gap_closed
    assert model["excess_over_bayes"] == pytest.approx(0.10)
    assert model["reachable_gap"] == pytest.approx((1.20 - 1.10) / (1.20 - 1.00))
    assert results.overall["em_tied"]["excess_over_bayes"] == pytest.approx(0.20)
    assert results.overall["oracle"]["excess_over_bayes"] == pytest.approx(-0.30)
    assert "excess_over_bayes" not in results.overall["bayes"]
    assert results.breakdowns["by_k"] == {"2": results.overall}  # K = 3 had no sets


def test_no_reachable_gap_where_tied_em_is_not_above_the_floor() -> None:
    shape = Layout((("all", ""),), ("model", "bayes", "em_tied"), ("mse",))
    # tied EM 0.5 % below the floor (Monte-Carlo noise of a short chain): no ratio to report
    sums = torch.tensor([[2.0, 2 * 1.10, 2 * 1.000, 2 * 0.995]], dtype=torch.float64)
    results = summarise(sums, shape)
    assert "reachable_gap" not in results.model and "excess_over_bayes" in results.model
