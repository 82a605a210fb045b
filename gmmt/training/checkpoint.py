"""Run folders and atomic, verifiable step checkpoints.

A checkpoint ``checkpoints/step_<n>/`` holds Accelerate's model (safetensors) and optimizer
(``optimizer.bin``, read back with ``weights_only=True``), gmmt's own per-rank RNG state
(``random_states_<rank>.safetensors``), the EMA weights (``ema.safetensors``),
``trainer_state.json`` (counters, schedule, accumulated time), ``config.json`` and, written
last, ``manifest.json`` (every file's size and sha256). Nothing in it is unpickled: Accelerate's
``random_states_<rank>.pkl`` is removed and no object is registered with Accelerate (it would
load those with full pickle).

The folder is written under a hidden temporary name and renamed when complete, so a process
killed mid-write never leaves a folder that looks like a checkpoint; the manifest catches what
the rename cannot (a file truncated by a crash of the machine, a disk error, a hand edit).
``best/`` and ``final/`` hold ``model.safetensors`` + ``config.json`` (:mod:`gmmt.saved_model`).
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gmmt.saved_model import DamagedFileError, write_json_atomic

log = logging.getLogger("gmmt")

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
EMA_FILE = "ema.safetensors"
RNG_FILE = re.compile(r"^random_states_(\d+)\.safetensors$")

# What trainer_state.json must hold, with the JSON types each key may have. A state missing
# any of them is damaged: updating initial_state() with it would silently restart counters.
STATE_KEYS: dict[str, tuple[type, ...]] = {
    "step": (int,), "epoch": (int,), "best_metric": (float, int, type(None)),
    "best_step": (int, type(None)), "evals_without_improvement": (int,),
    "nonfinite_in_a_row": (int,), "skipped_steps": (int,), "scheduler": (dict,),
    "num_processes": (int,), "train_time_s": (float, int)}


def rng_file(rank: int) -> str:
    return f"random_states_{rank}.safetensors"


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished step checkpoints of a run (with a manifest), oldest first; not verified."""
    return [(step, path) for step, path in step_dirs(run_dir) if (path / MANIFEST).is_file()]


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_<n>`` folder of a run, finished or not, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run that passes :func:`verify_checkpoint`; each newer one
    that does not is skipped with a warning naming the damaged file."""
    for _, path in reversed(step_dirs(run_dir)):
        try:
            verify_checkpoint(path)
        except DamagedFileError as err:
            log.warning("skipping damaged checkpoint: %s", err)
            continue
        return path
    return None


def temporary_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".tmp-step_{step}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (Accelerate may write subfolders, e.g. sharded FSDP state),
    as POSIX paths relative to it, the manifest excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256 in ``manifest.json``: written last, it marks the
    checkpoint as finished."""
    entries = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
               for name in _files(folder)}
    write_json_atomic(folder / MANIFEST, {"format": 1, "files": entries})


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking that every file the manifest lists is
    there with its size and hash, that no pickle or unlisted file was added, and that the
    trainer state is complete. Raises DamagedFileError naming the first bad file."""
    if not (path / MANIFEST).is_file():
        if not (path / TRAINER_STATE).is_file():
            raise DamagedFileError(path / TRAINER_STATE, "missing (the checkpoint was never "
                                   "finished)")
        raise DamagedFileError(path / MANIFEST, "missing (the checkpoint was never finished, "
                               "or was written by an older gmmt)")
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        listed = {str(name): (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedFileError(path / MANIFEST, f"unreadable ({type(err).__name__})") from None
    for name in _files(path):
        if name.endswith(".pkl"):  # gmmt writes none and unpickling can run code
            raise DamagedFileError(path / name, "is a pickle; gmmt checkpoints hold none and "
                                   "gmmt will not load it")
        if name not in listed:
            raise DamagedFileError(path / name, "is not in the checkpoint's manifest")
    for name, (size, sha) in listed.items():
        file = path / name
        if not file.is_file():
            raise DamagedFileError(file, "missing")
        if file.stat().st_size != size:
            raise DamagedFileError(file, f"has {file.stat().st_size} bytes, the manifest "
                                   f"says {size} (truncated or overwritten)")
        if _sha256(file) != sha:
            raise DamagedFileError(file, "does not match its sha256 in the manifest (corrupted "
                                   "or edited)")
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, checked for every key :data:`STATE_KEYS` names."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DamagedFileError(file, f"unreadable ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise DamagedFileError(file, "is not a JSON object")
    for key, types in STATE_KEYS.items():
        value = state.get(key)
        if key not in state or isinstance(value, bool) or not isinstance(value, types):
            raise DamagedFileError(file, f"has no valid {key!r} (incomplete trainer state)")
    match = STEP_DIR.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise DamagedFileError(file, f"says step {state['step']} in folder {path.name}")
    return state


# --- per-rank RNG state, in safetensors ------------------------------------------------------

def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's Python, NumPy, torch and CUDA generator states as tensors."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python_state": torch.tensor(internal, dtype=torch.int64),
           "python_meta": torch.tensor([version, gauss_next is not None], dtype=torch.int64),
           "python_gauss": torch.tensor([gauss_next or 0.0], dtype=torch.float64),
           "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
           "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
           "numpy_gauss": torch.tensor([cached], dtype=torch.float64)}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = state
    return out


def set_rng_tensors(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`rng_tensors`."""
    torch.set_rng_state(state["torch"])
    version, has_gauss_next = state["python_meta"].tolist()
    gauss_next = state["python_gauss"].item() if has_gauss_next else None
    random.setstate((version, tuple(state["python_state"].tolist()), gauss_next))
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos,
                         has_gauss, state["numpy_gauss"].item()))
    cuda = [state[f"cuda_{i}"] for i in range(len(state)) if f"cuda_{i}" in state]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_rank_state(folder: Path, rank: int) -> None:
    """Every process, after ``Accelerator.save_state``: its RNG state in safetensors, and
    Accelerate's pickle of the same removed (gmmt never loads pickles it did not write
    with weights only)."""
    save_file(rng_tensors(), str(folder / rng_file(rank)))
    (folder / f"random_states_{rank}.pkl").unlink(missing_ok=True)


def checkpoint_ranks(path: Path) -> list[int]:
    """The ranks whose RNG state a checkpoint holds."""
    return sorted(int(m.group(1)) for p in path.iterdir() if (m := RNG_FILE.match(p.name)))


def process_count_problem(path: Path, num_processes: int) -> str | None:
    """Why this checkpoint cannot be continued bit-exactly by ``num_processes`` processes
    (each rank draws its own batches, so the count is part of the batch layout), or None."""
    ranks = checkpoint_ranks(path)
    if ranks == list(range(num_processes)):
        return None
    if not ranks:
        written = "a run whose RNG state is missing (no random_states_<rank>.safetensors)"
    elif ranks == list(range(len(ranks))):
        written = f"{len(ranks)} process(es)"
    else:
        written = f"processes with RNG states of ranks {ranks} only"
    return (f"{path} was written by {written} and this run has {num_processes}: the batches "
            f"drawn per process are part of the locked batch layout")


def load_rank_state(path: Path, rank: int) -> bool:
    """Restore this process's RNG state; False when the checkpoint has none for this rank."""
    file = path / rng_file(rank)
    if not file.is_file():
        return False
    try:
        set_rng_tensors(load_file(str(file)))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as err:
        raise DamagedFileError(file, f"unreadable RNG state ({type(err).__name__})") from None
    return True


def save_ema(folder: Path, shadow: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in shadow.items()},
              str(folder / EMA_FILE))


def load_ema(path: Path, shadow: dict[str, torch.Tensor]) -> bool:
    """Copy the saved EMA weights into ``shadow``; False when the checkpoint has none (EMA
    switched on at resume)."""
    file = path / EMA_FILE
    if not file.is_file():
        return False
    try:
        saved = load_file(str(file))
        if saved.keys() != shadow.keys():
            raise ValueError("other parameter names")
        for key, value in saved.items():
            shadow[key].copy_(value)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise DamagedFileError(file, f"does not hold this model's EMA weights "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                               ) from None
    return True


def finish_checkpoint(run_dir: Path, step: int, trainer_state: dict, keep_last: int,
                      ema_shadow: dict[str, torch.Tensor] | None = None) -> Path:
    """Main process, after every rank wrote its part: add the EMA weights, the trainer state
    and, last, the manifest; rename into place; prune old checkpoints and stale temporaries.

    Only checkpoints up to this step are pruned: a newer one (left by a run resumed from an
    older checkpoint) is not this timeline's to delete.
    """
    tmp = temporary_checkpoint_dir(run_dir, step)
    if ema_shadow is not None:
        save_ema(tmp, ema_shadow)
    write_json_atomic(tmp / TRAINER_STATE, trainer_state)
    write_manifest(tmp)
    final = run_dir / "checkpoints" / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    older = [path for s, path in step_dirs(run_dir) if s <= step]
    for old in older[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (run_dir / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final
