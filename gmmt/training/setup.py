"""Before the loop: the Accelerator, the run folder, and what a resume continues from."""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.overrides import diff
from gmmt.saved_model import RunFileError
from gmmt.training.checkpoint import (
    MANIFEST,
    STEP_DIR,
    TRAINER_STATE,
    latest_checkpoint,
    verify_checkpoint,
)
from gmmt.training.preflight import device_problems

log = logging.getLogger("gmmt")

# Settings a resumed run may not change: they define the model, the data stream or its layout.
# The validation bank size is locked too: best/ compares metrics across the whole run.
LOCKED_ON_RESUME = ("model", "data", "device.seed", "training.batch_size",
                    "training.gradient_accumulation_steps", "validation.num_sets",
                    "validation.batch_size")


def build_accelerator(config: ExperimentConfig) -> Accelerator:
    """An Accelerator for the configured device and precision ('auto' defers to the launcher).

    Raises ConfigError (before anything is written) when the device cannot be used here.
    """
    device = config.device.device
    precision = config.device.mixed_precision
    problems = device_problems(config)  # the same checks the pre-run check makes
    if problems:
        raise ConfigError(problems, "cannot run this configuration here")
    if device == "cuda" and config.device.gpu_id is not None:
        torch.cuda.set_device(config.device.gpu_id)
    if config.device.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != precision:
        log.warning("the launcher asked for mixed precision %r; the config's "
                    "device.mixed_precision=%r is used (set it with --set "
                    "device.mixed_precision=%s)", launcher, precision, launcher)
    return Accelerator(cpu=(device == "cpu"), mixed_precision=precision)


def find_resume_checkpoint(resume: str | Path, config: ExperimentConfig) -> Path:
    """``latest``: the newest good checkpoint of the newest run of this exp_name that has one;
    a run folder: its newest good checkpoint; a checkpoint folder: that one.

    Every candidate is verified (:func:`verify_checkpoint`: manifest sizes and hashes, no
    pickles, a complete trainer state). ``latest`` and a run folder skip a damaged checkpoint
    with a warning naming the file and fall back to an older one; a checkpoint named
    explicitly raises DamagedFileError (one line, exit code 2) instead.
    """
    if str(resume) == "latest":
        base = Path(config.paths.base_dir)
        runs = sorted(p for p in base.glob(f"{config.metadata.exp_name}-*") if p.is_dir())
        for run in reversed(runs):
            found = latest_checkpoint(run)
            if found is not None:
                return found
        raise ConfigError([f"no run of {config.metadata.exp_name!r} with a checkpoint that "
                           f"passes verification under {base}/"], "nothing to resume")
    path = Path(resume)
    if STEP_DIR.match(path.name) or (path / TRAINER_STATE).exists() or (path / MANIFEST).exists():
        if not path.is_dir():
            raise ConfigError([f"{path} is not a folder"], "nothing to resume")
        verify_checkpoint(path)
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ConfigError([f"{path} is neither a checkpoint nor a run folder with a usable one"],
                          "nothing to resume")
    return found


def _get(config_dict: dict, dotted: str) -> Any:
    out: Any = config_dict
    for key in dotted.split("."):
        out = out[key]
    return out


def resume_changes(run_dir: Path, config: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """What ``config`` changes against the run's saved config; ConfigError if it touches a
    locked setting (model, data, seed, batch layout)."""
    saved = ExperimentConfig.load(run_dir / "config.json").to_dict()
    new = config.to_dict()
    locked = []
    for path in LOCKED_ON_RESUME:
        for p, old, now in diff(_get(saved, path), _get(new, path), path):
            locked.append(f"{p} is locked on resume: the run has {json.dumps(old)}, "
                          f"this config {json.dumps(now)}")
    if locked:
        raise ConfigError(locked, f"cannot resume {run_dir}")
    return [c for c in diff(saved, new) if not c[0].startswith("metadata.")]


def make_run_dir(acc: Accelerator, config: ExperimentConfig) -> Path:
    """Create ``<base_dir>/<exp_name>-<timestamp>/`` on the main process; every process gets
    the same path."""
    run_dir = None
    if acc.is_main_process:
        base = Path(config.paths.base_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = base / f"{config.metadata.exp_name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = base / f"{config.metadata.exp_name}-{stamp}-{suffix}"
        try:
            # plots/ is made by the first plot drawn: a run without plots has no empty folder.
            (run_dir / "checkpoints").mkdir(parents=True)
        except OSError as err:  # unwritable, under a regular file, full disk
            raise RunFileError(f"cannot create the run folder {run_dir}: "
                               f"{err.strerror or err} (check paths.base_dir)") from None
    return Path(broadcast_object_list([str(run_dir)])[0])
