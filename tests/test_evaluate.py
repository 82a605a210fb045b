"""gmmt.evaluate on a tiny trained run, and the trainer's plots of that run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_config

from gmmt.config.experiment import ExperimentConfig
from gmmt.data.gmm import validation_bank
from gmmt.evaluate import main
from gmmt.evaluation.held_out import (
    DEFAULT_BASELINES,
    EvaluationError,
    evaluate_saved_model,
    evaluation_config,
    score_held_out,
)
from gmmt.training.experiment import ExperimentManager

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_config(base_dir: Path) -> ExperimentConfig:
    """The shared shrunk quick_test with three baselines, an SNR breakdown and every plot."""
    return small_config(
        base_dir, 'validation.baselines=["identity", "oracle", "kmeans"]',
        "validation.breakdown.by_snr=true", "validation.breakdown.snr_bins=2",
        'validation.visualization={"enabled": true, "baseline": "kmeans", "num_examples": 3, '
        '"plots": ["sample_grid", "training_curves", "error_vs_snr"]}',
        "logging.log_every_n_steps=1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    ExperimentManager(tiny_config(base)).run()
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


def is_png(path: Path) -> bool:
    raw = path.read_bytes()
    return raw[:8] == PNG_SIGNATURE and len(raw) > 10_000


def test_trainer_draws_the_configured_plots(run_dir: Path) -> None:
    names = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert names == ["error_vs_snr.png", "sample_grid.png", "training_curves.png"]
    assert all(is_png(run_dir / "plots" / n) for n in names)


def test_evaluate_prints_the_table_and_writes_every_result(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "--num-sets", "12", "--batch-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[4]
    for column in ("is told", "MSE", "MSE/σ²", "over the floor", "ARI", "NMI", "K right"):
        assert column in header
    for row in ("model", *DEFAULT_BASELINES):
        assert f"| {row} |" in out
    assert "model reachable gap: " in out and "; model gap closed: " in out
    assert "Bayes floor: the Gibbs chains disagree on " in out
    assert "### MSE over the Bayes floor by SNR" in out and "### K found, by K" in out
    assert "### MSE/σ² by SNR" in out and "### MSE/σ² by K" in out
    assert "| closest centres (σ) | sets |" in out and "| 12_inf |" in out

    folder = run_dir / "evaluation" / "training_data"
    result = json.loads((folder / "evaluation.json").read_text())
    assert set(result["baselines"]) == set(DEFAULT_BASELINES)
    for metrics in (result["model"], *result["baselines"].values()):
        assert metrics["mse"] > 0 and metrics["mse_over_noise"] > 0
    assert 0 <= result["baselines"]["oracle"]["mse"] <= result["baselines"]["identity"]["mse"]
    for key in ("gap_closed", "reachable_gap", "excess_over_bayes", "ari", "k_accuracy",
                "induced_ari"):
        assert key in result["model"], key
    assert "unconverged" in result["baselines"]["bayes"]
    assert "k_accuracy" in result["baselines"]["em_bic"]
    assert "k_accuracy" not in result["baselines"]["em"]  # told K
    # Breakdowns have their own sections, each split into model and baselines.
    assert not any(k.startswith(("by_snr.", "by_k.", "by_sep.")) for k in result["model"])
    for kind in ("by_snr", "by_k", "by_sep"):
        groups = result[kind]
        assert groups and all(set(g) == {"model", "baselines"} for g in groups.values())
        assert all(set(g["baselines"]) == set(DEFAULT_BASELINES) for g in groups.values())
    assert result["stream"] == "evaluation" and result["num_sets"] == 12
    for kind in ("by_snr", "by_k", "by_sep"):
        assert sum(result["sets_per_bin"][kind].values()) == 12
        assert set(result["sets_per_bin"][kind]) == set(result[kind])
    assert (folder / "evaluation.md").read_text() == out
    assert result["plots"] == ["error_vs_snr.png", "sample_grid.png", "training_curves.png"]
    assert all(is_png(folder / name) for name in result["plots"])


def test_evaluate_json_on_a_data_preset_from_best(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(run_dir / "best"), "--data-preset", "simple_snr15", "--num-sets", "4",
            "--baselines", "oracle", "kmeans", "--json", "--seed", "5", "--device", "cpu"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["baselines"]) == {"oracle", "kmeans"}
    assert "gap_closed" not in result["model"]  # needs EM
    assert result["data_preset"] == "simple_snr15" and result["seed"] == 5
    assert result["data"]["snr_db_params"] == {**result["data"]["snr_db_params"],
                                               "type": "fixed", "value": 15.0}
    assert (run_dir / "evaluation" / "simple_snr15-best" / "evaluation.json").is_file()


def test_the_bank_is_not_the_validation_bank(run_dir: Path) -> None:
    saved = ExperimentConfig.load(run_dir / "config.json")
    config = evaluation_config(saved, 4, 4, ["identity"])

    class Identity(torch.nn.Module):
        def forward(self, points, mask=None, snr_db=None):
            return points

    results, first = score_held_out(Identity(), saved.data, config, saved.device.seed,
                                    torch.device("cpu"), progress=False)
    validation = validation_bank(saved.data, saved.device.seed, 4, 4)[0]
    assert first.points.shape == validation.points.shape
    assert not torch.equal(first.points, validation.points)
    assert results.model["mse"] == pytest.approx(results.overall["identity"]["mse"])
    # every breakdown's bins hold all 4 sets between them
    for kind in ("by_snr", "by_k", "by_sep"):
        assert sum(results.counts[kind].values()) == 4


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "does not exist"),
    (["{tmp}"], "holds no saved model"),
    (["{tmp}/unfinished"], "has no final/ model (the run has not finished)"),
    (["{run}", "--data-preset", "simpel"], "unknown data preset 'simpel' (did you mean "
                                          "'simple'?)"),
    (["{run}", "--num-sets", "0"], "--num-sets and --batch-size must be >= 1"),
])
def test_mistakes_exit_2_with_a_message(run_dir: Path, tmp_path: Path, args: list[str],
                                        message: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_command_line_bad_path_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gmmt.evaluate", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_library_call_names_an_unknown_baseline(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"unknown baseline.*'emm'.*choose from"):
        evaluate_saved_model(run_dir, baselines=["oracle", "emm"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a bad call


@pytest.mark.parametrize("chosen", [["bayes"], ["em_bic"], ["em_bic", "bayes"]])
def test_any_subset_of_baselines_can_be_scored(run_dir: Path, chosen: list[str]) -> None:
    saved = ExperimentConfig.load(run_dir / "config.json")
    saved.validation.bayes.num_samples = 7
    config = evaluation_config(saved, 4, 4, chosen)
    assert config.visualization.baseline in chosen
    assert config.bayes == saved.validation.bayes  # the run's own sampler settings
