"""Run folders and atomic step checkpoints.

A checkpoint ``checkpoints/step_<n>/`` is Accelerate state (model in safetensors, optimizer,
RNG per rank, registered objects) plus ``trainer_state.json``. It is written under a hidden
temporary name and renamed when complete, so a process killed mid-write never leaves a folder
that looks like a checkpoint. ``best/`` and ``final/`` hold ``model.safetensors`` +
``config.json`` (:mod:`gmmt.saved_model`).
"""

import os
import re
import shutil
from pathlib import Path

from gmmt.saved_model import write_json_atomic

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def temporary_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".tmp-step_{step}"


def finish_checkpoint(run_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Main process, after every rank wrote its part: add the trainer state, rename into place,
    prune old checkpoints and stale temporaries."""
    tmp = temporary_checkpoint_dir(run_dir, step)
    write_json_atomic(tmp / TRAINER_STATE, trainer_state)
    final = run_dir / "checkpoints" / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (run_dir / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final
