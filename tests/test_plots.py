"""Plots: valid PNG files with the expected layout, from batches, metrics.jsonl and metrics."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from gmmt.config.presets import resolve_config
from gmmt.config.validation import ValidationConfig, VisualizationConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import validation_bank
from gmmt.evaluation.plots import (
    PLOT_FILES,
    curriculum_end,
    plot_error_vs_snr,
    plot_sample_grid,
    plot_training_curves,
    snr_breakdown,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking it is one and is not trivially small."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert raw[12:16] == b"IHDR"
    assert len(raw) > 10_000, f"{path} is suspiciously small ({len(raw)} bytes)"
    return struct.unpack(">II", raw[16:24])


def bank(*extra: str, num_sets: int = 6) -> GMMBatch:
    data = resolve_config("quick_test", overrides=[
        'data.sample_count_distribution={"type": "uniform", "min": 30, "max": 60}',
        *extra]).config.data
    return validation_bank(data, 0, num_sets, num_sets)[0]


def noisy(batch: GMMBatch, scale: float, seed: int = 0) -> torch.Tensor:
    """Fake predictions: the true centres plus noise ``scale * sigma``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.points.shape, generator=g)
    return batch.target + scale * batch.sigma[:, None, None] * noise


def test_sample_grid_is_a_png_with_one_row_per_method(tmp_path: Path) -> None:
    batch = bank()
    preds = {"model": noisy(batch, 0.2), "kmeans": noisy(batch, 0.5, seed=1)}
    path = plot_sample_grid(batch, preds, tmp_path / "out" / PLOT_FILES["sample_grid"], 4)
    assert path == tmp_path / "out" / "sample_grid.png"
    width, height = png_size(path)
    assert width > 1.5 * height  # 4 columns, 2 rows
    one_row = plot_sample_grid(batch, {"model": preds["model"]}, tmp_path / "one.png", 4)
    assert png_size(one_row)[1] < height


def test_sample_grid_handles_ragged_sets_and_small_batches(tmp_path: Path) -> None:
    batch = bank("data.ragged=true", num_sets=3)
    assert batch.mask is not None and not batch.mask.all()
    path = plot_sample_grid(batch, {"model": noisy(batch, 0.3)}, tmp_path / "g.png", 6)
    png_size(path)


def test_sample_grid_rejects_mismatched_predictions(tmp_path: Path) -> None:
    batch = bank()
    with pytest.raises(ValueError, match="predictions\\['model'\\] has shape"):
        plot_sample_grid(batch, {"model": batch.points[:, :5]}, tmp_path / "g.png", 2)
    with pytest.raises(ValueError, match="at least one"):
        plot_sample_grid(batch, {}, tmp_path / "g.png", 2)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_curves_with_baselines_resumed_steps_and_nan(tmp_path: Path) -> None:
    rows = [{"step": s, "time": 0.0, "train/loss": 1.0 / s} for s in range(1, 41)]
    rows.append({"step": 20, "train/loss": "nan"})  # logged non-finite; a resumed duplicate
    for s in (10, 20, 30, 40):
        rows.append({"step": s, "val/mse": 0.1 / s, "val/mse_over_noise": 1.0 / s,
                     "val/baselines.oracle.mse": 0.002, "val/baselines.kmeans.mse": 0.004,
                     "val/by_snr.3.0_5.0.mse": 0.5})
    path = plot_training_curves(write_jsonl(tmp_path / "metrics.jsonl", rows),
                                tmp_path / "training_curves.png")
    width, height = png_size(path)
    assert width > height


def test_training_curves_shade_the_curriculum(tmp_path: Path) -> None:
    rows = [{"step": s, "train/loss": 1.0 / s, "train/curriculum": float(s <= 30)}
            for s in range(10, 60, 10)]
    rows.append({"step": 50, "val/mse": 0.01})
    assert curriculum_end(rows) == 30
    assert curriculum_end([{"step": 10, "train/loss": 1.0}]) is None
    assert curriculum_end([{"step": 10, "train/curriculum": 0.0}]) is None
    png_size(plot_training_curves(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "t.png"))


def test_training_curves_without_validation(tmp_path: Path) -> None:
    rows = [{"step": s, "train/loss": 1.0 - 0.1 * s} for s in range(1, 20)]  # goes negative
    png_size(plot_training_curves(write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "t.png"))


def snr_scores() -> dict[str, dict[str, dict[str, float]]]:
    """Per-SNR scores as Results.breakdowns["by_snr"] holds them; dotted bin labels."""
    out = {}
    for i, label in enumerate(["12.0_13.0", "3.0_5.5", "5.5_12.0", "-2_3"]):
        out[label] = {"model": {"mse": 0.1 * (i + 1), "mse_over_noise": 1.0 / (i + 1)},
                      "em": {"mse_over_noise": 2.0 / (i + 1)},
                      "oracle": {"mse_over_noise": 0.5 / (i + 1)}}
    del out["-2_3"]["oracle"]
    return out


def test_snr_breakdown_parses_dotted_bins_in_snr_order() -> None:
    labels, series = snr_breakdown(snr_scores(), "mse_over_noise")
    assert labels == ["-2_3", "3.0_5.5", "5.5_12.0", "12.0_13.0"]
    assert list(series) == ["model", "oracle", "em"]
    assert series["model"] == [1 / 4, 1 / 2, 1 / 3, 1.0]
    assert math.isnan(series["oracle"][0])  # a bin a baseline lacks is a gap, not a shift
    assert snr_breakdown(snr_scores(), "mse")[1] == {"model": pytest.approx([0.4, 0.2, 0.3, 0.1])}


def test_error_vs_snr(tmp_path: Path) -> None:
    path = plot_error_vs_snr(snr_scores(), tmp_path / PLOT_FILES["error_vs_snr"])
    png_size(path)
    with pytest.raises(ValueError, match="by_snr"):
        plot_error_vs_snr({}, tmp_path / "none.png")


def test_error_vs_snr_adds_a_panel_relative_to_the_floor(tmp_path: Path) -> None:
    scores = snr_scores()
    plain = png_size(plot_error_vs_snr(scores, tmp_path / "plain.png"))
    for bin_scores in scores.values():
        bin_scores["bayes"] = {"mse_over_noise": 0.4}
        for method, values in bin_scores.items():
            if method != "bayes" and "mse_over_noise" in values:
                values["excess_over_bayes"] = values["mse_over_noise"] / 0.4 - 1
    overall = {"model": {"mse": 0.1, "excess_over_bayes": 0.083, "reachable_gap": -0.5}}
    with_floor = png_size(plot_error_vs_snr(scores, tmp_path / "floor.png", overall))
    assert with_floor[1] > 1.4 * plain[1]  # a second panel below the first


def test_draw_plots_skips_what_it_cannot_draw(tmp_path: Path) -> None:
    from gmmt.evaluation.report import draw_plots
    from gmmt.evaluation.results import Results

    class Shrink(torch.nn.Module):  # a stand-in model: halfway from each point to its mean
        def forward(self, points, mask=None, snr_db=None):
            return 0.5 * points + 0.5 * points.mean(dim=1, keepdim=True)

    config = ValidationConfig(baselines=["kmeans"], visualization=VisualizationConfig(
        enabled=True, plots=["sample_grid", "training_curves", "error_vs_snr"],
        baseline="kmeans", num_examples=3))
    results = Results({"model": {"mse": 1.0}})
    drawn = draw_plots(config, tmp_path / "plots", Shrink(), bank(), results, None)
    assert list(drawn) == ["sample_grid"]  # no metrics.jsonl, no by_snr metrics
    assert drawn["sample_grid"] == tmp_path / "plots" / "sample_grid.png"
    png_size(drawn["sample_grid"])
