"""Shared test helpers (imported by the test modules of this folder)."""

from pathlib import Path

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.presets import resolve_config


def small_config(base_dir: Path, *extra: str, model: str | None = None) -> ExperimentConfig:
    """quick_test shrunk to seconds: 4 steps of 4 sets of 40 points on CPU, validation every
    2 steps on 8 sets (quick_test's yardsticks, no plots), no wandb or progress bar; ``extra``
    are more ``--set`` overrides and ``model`` another model preset."""
    return resolve_config("quick_test", model=model, overrides=[
        "device.device=cpu", f"paths.base_dir={base_dir}", "metadata.exp_name=t",
        "training.num_epochs=2", "training.steps_per_epoch=2", "training.batch_size=4",
        "training.scheduler.warmup_steps=1",
        'data.sample_count_distribution={"type": "fixed", "value": 40}',
        "validation.num_sets=8", "validation.batch_size=4", "validation.every_n_steps=2",
        "validation.visualization.enabled=false",  # matplotlib would triple the run time
        "logging.wandb.enabled=false", "logging.progress_bar=false", *extra]).config
