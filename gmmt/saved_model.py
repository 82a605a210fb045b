"""Saved models: ``model.safetensors`` + ``config.json`` in one folder (a run's ``best/`` and
``final/``), written atomically and read back without unpickling anything.

Training writes these folders and evaluation reads them, so this module sits below both.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.model.build import build_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class RunFileError(ConfigError):
    """A file or folder of a run cannot be read or written. A ConfigError so that both CLIs
    print it as one line and exit with code 2, with no traceback: the cause is the user's
    files or disk, not a bug."""

    def __init__(self, message: str) -> None:
        super().__init__([message], "run file error")
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class DamagedFileError(RunFileError):
    """A saved file is missing, truncated, corrupted or not what gmmt wrote."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"damaged file {self.path}: {problem}")


def first_line(err: BaseException) -> str:
    """An exception as one short line (torch and safetensors messages run over many)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON: to a temporary name, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def export_model(model: nn.Module, config: ExperimentConfig, folder: Path,
                 extra: dict[str, Any] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
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
    # The previous folder is set aside, not deleted, until the new one is in place.
    previous = folder.with_name(f".previous-{folder.name}")
    if previous.exists():
        shutil.rmtree(previous)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(tmp, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model from a ``final/`` or ``best/`` folder (or a run folder, which
    means its ``final/``). Reads safetensors and JSON only: nothing is unpickled."""
    folder = Path(path)
    if not (folder / MODEL_FILE).is_file() and (folder / "final" / MODEL_FILE).is_file():
        folder = folder / "final"
    if not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {folder} (expected a final/ or best/ folder)")
    config = ExperimentConfig.load(folder / CONFIG_FILE)
    model = build_model(config.model, config.data.dim, config.data.max_clusters)
    file = folder / MODEL_FILE
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedFileError(file, f"not readable as safetensors ({first_line(err)})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or wrongly shaped tensors
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise DamagedFileError(file, "does not fit the model its config.json describes ("
                               + (problems[0] if problems else first_line(err))[:200]
                               + ")") from None
    return model.to(device).eval()
