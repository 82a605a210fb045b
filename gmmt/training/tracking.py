"""Where metrics go: metrics.jsonl always; wandb and tensorboard when configured.

Only the main process creates trackers; other ranks get a :class:`Trackers` with no sinks.
"""

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path

from gmmt.config.experiment import ExperimentConfig

log = logging.getLogger("gmmt")


def tracker_problems(config: ExperimentConfig) -> list[str]:
    """Configured trackers whose packages are missing (checked before a run folder exists)."""
    problems = []
    if config.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("logging.tensorboard needs the tensorboard package (pip install "
                            "tensorboard), or set it to false @ $.logging.tensorboard")
    return problems


class Trackers:
    """Fan-out of scalar metrics (and images) to every configured sink."""

    def __init__(self, run_dir: Path | None, config: ExperimentConfig | None = None,
                 wandb_run_id: str | None = None) -> None:
        self.run_dir = run_dir
        self._jsonl = None
        self._wandb = None
        self._tensorboard = None
        self.wandb_run_id = wandb_run_id
        if run_dir is None or config is None:
            return
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        wb = config.logging.wandb
        if wb.enabled and wb.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            self._start_wandb(config, run_dir)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def _start_wandb(self, config: ExperimentConfig, run_dir: Path) -> None:
        import wandb

        wb = config.logging.wandb
        self.wandb_run_id = self.wandb_run_id or secrets.token_hex(4)
        self._wandb = wandb.init(
            project=wb.project, entity=wb.entity, mode=wb.mode, dir=str(run_dir),
            id=self.wandb_run_id, resume="allow", name=run_dir.name,
            config=config.to_dict(), tags=config.metadata.tags or None,
            settings=wandb.Settings(console="off", silent=True, init_timeout=120),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": step, "time": time.time(),
                      **{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
                         for k, v in clean.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tensorboard is not None:
            for key, value in clean.items():
                if isinstance(value, float):
                    self._tensorboard.add_scalar(key, value, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """Send PNG files to the trackers that take images."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def setup_logging(run_dir: Path | None, config: ExperimentConfig, is_main: bool) -> None:
    """Console and train.log handlers on the main process; warnings only elsewhere."""
    logger = logging.getLogger("gmmt")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(config.logging.console_level.upper() if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if is_main and run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setLevel(config.logging.file_level.upper())
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
