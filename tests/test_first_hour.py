"""What a new user meets in the first hour: precision shorthands, the console, quick_test's
yardsticks, and the refusal of GPU-sized runs on a CPU."""

import json
from pathlib import Path

import helpers
import pytest

from gmmt.config.experiment import ExperimentConfig, resolve_mixed_precision
from gmmt.config.presets import resolve_config
from gmmt.config.schema import json_schema
from gmmt.training.experiment import ExperimentManager


def only_run(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


# --- device.mixed_precision: true / false ------------------------------------------------------


def test_boolean_mixed_precision_is_accepted_and_documented(tmp_path: Path) -> None:
    file = tmp_path / "seed.json"
    file.write_text(json.dumps({"device": {"device": "cpu", "mixed_precision": True}}))
    config = resolve_config(config_file=file).config
    assert config.device.mixed_precision is True
    assert resolve_mixed_precision(config.device) in ("bf16", "no")  # CPU: never fp16
    off = resolve_config(overrides=["device.mixed_precision=false"]).config
    assert resolve_mixed_precision(off.device) == "no"
    prop = json_schema()["$defs"]["DeviceConfig"]["properties"]["mixed_precision"]
    assert {"type": "boolean"} in prop["anyOf"] and "true" in prop["description"]


@pytest.mark.parametrize("value", ["1", '"yes"', "null"])
def test_other_mixed_precision_values_still_fail(value: str) -> None:
    with pytest.raises(Exception, match=r"@ \$\.device\.mixed_precision"):
        resolve_config(overrides=[f"device.mixed_precision={value}"])


def test_resolved_precision_is_what_the_run_saves(tmp_path: Path) -> None:
    config = helpers.small_config(tmp_path, "device.mixed_precision=false")
    ExperimentManager(config).run()
    saved = json.loads((only_run(tmp_path) / "config.json").read_text())
    assert saved["device"]["mixed_precision"] == "no"
    assert ExperimentConfig.load(only_run(tmp_path) / "config.json").device.mixed_precision == "no"


# --- the console: banner, progress lines, short validation line ------------------------------


def test_console_shows_a_banner_progress_lines_and_short_validation_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = helpers.small_config(tmp_path, "logging.log_every_n_steps=2",
                                  'validation.baselines=["identity", "kmeans"]')
    ExperimentManager(config).run()
    err = capsys.readouterr().err
    run = only_run(tmp_path)
    assert f"gmmt run {run.name}" in err
    assert "experiment  quick_test (model=tiny, training=quick, data=simple" in err
    assert "training.batch_size: 16 -> 4" in err  # the diff against the preset
    assert "device      cpu, 1 process, precision no" in err
    assert "parameters" in err and str(run) in err
    assert '"metadata": {' not in err  # no resolved JSON on the console ...
    assert '"metadata": {' in (run / "train.log").read_text()  # ... but in train.log
    # progress_bar=false (and no terminal): a progress line every log_every_n_steps
    assert "step 2/4 (50%): loss " in err and "points/s, ETA" in err
    assert "step 4/4 (100%)" in err
    line = next(x for x in err.splitlines() if "step 4 validation:" in x)
    assert "model mse" in line and "mse/σ²" in line and "model/kmeans" in line
    assert "by_" not in line and "baselines.kmeans" not in line  # flat keys: metrics.jsonl
    assert len(line) < 200


def test_validation_line_shows_the_gaps_it_has() -> None:
    from gmmt.evaluation.results import Results
    from gmmt.training.tracking import validation_line

    results = Results({"model": {"mse": 0.011, "mse_over_noise": 1.1, "gap_closed": 0.04,
                                 "reachable_gap": None},
                       "oracle": {"mse": 0.009}, "em": {"mse": 0.0115}, "em_tied": {"mse": 0.012},
                       "identity": {"mse": 0.5}})
    line = validation_line(7, results)
    assert line.startswith("step 7 validation: model mse 0.011 (mse/σ² 1.1)")
    assert "model/em 0.957" in line and "gap_closed 0.04" in line
    assert "reachable_gap" not in line  # not computed


def test_without_a_terminal_the_cli_prints_progress_lines(tmp_path: Path) -> None:
    """The default progress bar hides itself without a TTY (nohup, CI, SLURM): lines instead."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gmmt.run", "--preset", "quick_test", "--device", "cpu",
         "--set", f"paths.base_dir={tmp_path}", "--set", "training.num_epochs=1",
         "--set", "training.steps_per_epoch=4", "--set", "training.batch_size=2",
         "--set", "training.scheduler.warmup_steps=1", "--set", "logging.log_every_n_steps=2",
         "--set", "validation.num_sets=4", "--set", "validation.batch_size=4",
         "--set", "logging.wandb.enabled=false"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "step 2/4 (50%)" in result.stderr and "step 4/4 (100%)" in result.stderr


def test_evaluation_prints_progress_lines_without_a_terminal(
        capsys: pytest.CaptureFixture) -> None:
    import torch

    from gmmt.evaluation.held_out import evaluation_config, score_held_out

    saved = helpers.small_config(Path("unused"))
    config = evaluation_config(saved, 8, 4, ["identity", "kmeans"])

    class Identity(torch.nn.Module):
        def forward(self, points, mask=None, snr_db=None):
            return points

    score_held_out(Identity(), saved.data, config, 0, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "evaluating 8 sets in 2 batches on cpu: the model and identity, kmeans" in err
    assert "batch 1/2 (50%)" in err and "batch 2/2 (100%)" in err


# --- quick_test can be judged ------------------------------------------------------------------


def test_quick_test_is_scored_against_cheap_yardsticks(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    config = helpers.small_config(tmp_path)  # quick_test's own validation preset
    assert config.metadata.component_presets["validation"] == "quick"
    summary = ExperimentManager(config).run()
    assert set(summary["baselines"]) == {"identity", "oracle", "em"}
    assert summary["baselines"]["em"]["mse"] > 0 and summary["model"]["mse"] > 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "done in" in last and "model/em" in last and "oracle" in last


def test_training_curves_title_mentions_baselines_only_when_drawn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gmmt.evaluation import plots

    titles: list[list[str]] = []

    def capture(fig, path):
        titles.append([ax.get_title() for ax in fig.axes])
        return Path(path)

    monkeypatch.setattr(plots, "_save", capture)
    rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5, "val/mse": 0.1}]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.plot_training_curves(jsonl, tmp_path / "a.png")
    rows.append({"step": 2, "val/baselines.em.mse": 0.05})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.plot_training_curves(jsonl, tmp_path / "b.png")
    assert "Validation MSE" in titles[0] and "dashed" not in " ".join(titles[0])
    assert "Validation MSE (baselines dashed)" in titles[1]
