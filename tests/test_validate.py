"""Tests of gmmt.evaluation.validate: key layout, breakdown sums, derived metrics, determinism."""

import math

import pytest
import torch
from torch import nn

from gmmt.config.data import DataConfig, DistributionSpec
from gmmt.config.validation import BreakdownConfig, EMConfig, ValidationConfig
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.validate import averages, metric_keys, validation_sums

ALL_METRICS = ["mse", "mse_over_noise", "gap_closed", "ari", "nmi", "energy", "wasserstein"]
ALL_BASELINES = ["identity", "oracle", "em", "kmeans"]


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


@pytest.fixture(scope="module")
def sums(data: DataConfig, bank: list) -> dict[str, torch.Tensor]:
    return validation_sums(Identity(), bank,
                           full_config(by_snr=True, by_k=True, by_separation=True), data, 3)


def test_sums_follow_metric_keys(data: DataConfig, sums: dict) -> None:
    keys = metric_keys(full_config(by_snr=True, by_k=True, by_separation=True), data)
    assert list(sums) == keys and len(keys) == len(set(keys))
    assert keys[:3] == ["count", "mse", "mse_over_noise"]
    assert "baselines.em.ari" in keys and "by_snr.12_13.baselines.em.mse" in keys
    assert "by_k.4.wasserstein" in keys and "by_snr.16_17.count" in keys
    assert "by_sep.0_3.count" in keys and "by_sep.12_inf.baselines.oracle.mse" in keys
    assert not any(k.endswith("gap_closed") for k in keys)  # derived, never summed
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in sums.values())
    assert float(sums["count"]) == 40


def test_averages_cover_the_keys_and_derive_gap_closed(sums: dict) -> None:
    means = averages(sums)
    groups = [k[: -len("count")] for k in sums if k.endswith("count")]
    nonempty = [g for g in groups if float(sums[g + "count"]) > 0]
    expected = {k for k in sums if not k.endswith("count")
                and float(sums[max((g for g in groups if k.startswith(g)), key=len) + "count"])
                > 0}
    derived = {g + "gap_closed" for g in nonempty}
    assert set(means) == expected | derived
    assert means["gap_closed"] == pytest.approx(
        (means["baselines.em.mse"] - means["mse"])
        / (means["baselines.em.mse"] - means["baselines.oracle.mse"]))
    assert list(means).index("gap_closed") == list(means).index("mse") + 1
    assert means["mse"] == pytest.approx(float(sums["mse"]) / 40)


def test_breakdowns_sum_back_to_the_totals(sums: dict) -> None:
    names = [k for k in sums if not k.startswith("by_")]
    for breakdown, bins in (("by_snr.", 5), ("by_k.", 3), ("by_sep.", 4)):
        groups = {k[: -len("count")] for k in sums if k.startswith(breakdown)
                  and k.endswith(".count")}
        assert len(groups) == bins
        for name in names:
            total = sum(float(sums[g + name]) for g in groups)
            assert total == pytest.approx(float(sums[name]), rel=1e-12, abs=1e-12), name


def test_identity_model_scores_like_the_identity_baseline(sums: dict) -> None:
    for metric in ("mse", "mse_over_noise", "ari", "nmi", "energy", "wasserstein"):
        assert float(sums[metric]) == pytest.approx(
            float(sums[f"baselines.identity.{metric}"]), rel=1e-12), metric
    means = averages(sums)
    assert means["mse_over_noise"] == pytest.approx(1.0, abs=0.1)  # identity: MSE ~ sigma^2
    assert means["baselines.oracle.mse"] < means["baselines.em.mse"] < means["mse"]
    assert 0.0 < means["baselines.em.ari"] <= 1.0


def test_only_what_the_config_asks_for(data: DataConfig, bank: list) -> None:
    minimal = ValidationConfig(metrics=["mse"], baselines=[])
    assert metric_keys(minimal, data) == ["count", "mse"]
    sums = validation_sums(Identity(), bank[:1], minimal, data)
    assert list(sums) == ["count", "mse"] and set(averages(sums)) == {"mse"}
    gap_only = ValidationConfig(metrics=["gap_closed", "ari"], baselines=["oracle", "em"])
    keys = metric_keys(gap_only, data)
    assert keys == ["count", "mse", "ari", "baselines.oracle.mse", "baselines.oracle.ari",
                    "baselines.em.mse", "baselines.em.ari"]


def test_deterministic_and_restores_the_model_mode(data: DataConfig, bank: list) -> None:
    config = ValidationConfig(metrics=["mse", "ari"], baselines=["em", "kmeans"])
    model = Shrink().train()
    first = validation_sums(model, bank, config, data, generator_seed=7)
    assert model.training
    second = validation_sums(model.eval(), bank, config, data, generator_seed=7)
    assert not model.training
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not any(v.requires_grad for v in first.values())


def test_empty_groups_are_left_out_of_the_averages(bank: list) -> None:
    wide = DataConfig(snr_db_params=DistributionSpec(type="uniform", min=2, max=17),
                      cluster_params=DistributionSpec(type="uniform", min=2, max=6))
    config = ValidationConfig(metrics=["mse"], baselines=["oracle"],
                              breakdown=BreakdownConfig(by_snr=True, snr_bins=3, by_k=True))
    sums = validation_sums(Identity(), bank[:1], config, wide)
    assert float(sums["by_snr.2_7.count"]) == 0 and float(sums["by_k.6.count"]) == 0
    means = averages(sums)
    assert "by_snr.2_7.mse" not in means and "by_k.6.mse" not in means
    assert "by_snr.12_17.mse" in means and not math.isnan(means["by_k.2.mse"])


def test_baseline_cache_gives_identical_sums_without_recomputing(monkeypatch) -> None:
    import gmmt.evaluation.validate as validate
    from gmmt.config.presets import resolve_config
    from gmmt.model.build import build_model

    cfg = resolve_config("quick_test", validation="comprehensive", overrides=[
        'data.sample_count_distribution={"type": "fixed", "value": 40}']).config
    bank = validation_bank(cfg.data, 0, 8, 4)
    model = build_model(cfg.model, cfg.data.dim)
    fresh = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0)
    cache: dict = {}
    first = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0, cache)
    calls = []
    monkeypatch.setattr(validate, "run_baseline", lambda *a, **k: calls.append(a))
    second = validate.validation_sums(model, bank, cfg.validation, cfg.data, 0, cache)
    assert not calls  # every baseline came from the cache
    assert len(cache) == len(bank) * len(cfg.validation.baselines)
    for key in fresh:
        assert torch.equal(fresh[key], first[key]) and torch.equal(first[key], second[key])
