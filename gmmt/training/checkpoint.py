"""Run folders, atomic checkpoints, and model export/import without pickle.

A checkpoint ``checkpoints/step_<n>/`` is Accelerate state (model in safetensors, optimizer,
RNG per rank, registered objects) plus ``trainer_state.json``. It is written under a hidden
temporary name and renamed when complete, so a process killed mid-write never leaves a folder
that looks like a checkpoint. ``best/`` and ``final/`` hold ``model.safetensors`` +
``config.json`` and are loaded by :func:`load_model`.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gmmt.config.experiment import ExperimentConfig

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def export_model(model: nn.Module, config: ExperimentConfig, folder: Path,
                 extra: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``info.json``) atomically.

    ``state_dict`` replaces ``model.state_dict()`` when given (a gathered FSDP state dict).
    """
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    save_file(state, str(tmp / MODEL_FILE))
    config.save(tmp / CONFIG_FILE)
    if extra:
        write_json_atomic(tmp / "info.json", extra)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model from a ``final/`` or ``best/`` folder (or a run folder, which
    means its ``final/``). Reads safetensors and JSON only: nothing is unpickled."""
    from gmmt.model.build import build_model

    folder = Path(path)
    if not (folder / MODEL_FILE).is_file() and (folder / "final" / MODEL_FILE).is_file():
        folder = folder / "final"
    if not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {folder} (expected a final/ or best/ folder)")
    config = ExperimentConfig.load(folder / CONFIG_FILE)
    model = build_model(config.model, config.data.dim)
    model.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(device)))
    return model.to(device).eval()
