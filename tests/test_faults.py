"""Damaged or hostile run folders: each test injects one fault (a truncated or forged file, a
crafted pickle, another process count, a full disk) and checks what gmmt does about it."""

import errno
import json
import logging
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file

import gmmt
from gmmt.config.experiment import ExperimentConfig
from gmmt.evaluate import main as evaluate_main
from gmmt.run import main as run_main
from gmmt.saved_model import DamagedFileError, RunFileError
from gmmt.training import checkpoint as ckpt_module
from gmmt.training.checkpoint import latest_checkpoint, verify_checkpoint, write_manifest
from gmmt.training.experiment import ExperimentManager, TrainingDiverged


def problem_lines(err: str) -> list[str]:
    """stderr without the pre-run check's information lines (memory and time per step)."""
    return [line for line in err.strip().splitlines()
            if not line.startswith(("gmmt: memory:", "gmmt: time:"))]


def config(base: Path, *extra: str) -> ExperimentConfig:
    """The shared 4-step run, checkpointing every step."""
    return helpers.small_config(base, "training.checkpointing.every_n_steps=1",
                                "training.checkpointing.keep_last=10", *extra)


def only_run(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


def stopped_run(base: Path, *extra: str, steps: int = 2) -> Path:
    """A run stopped after ``steps`` steps; its checkpoints are step_1 .. step_<steps>."""
    ExperimentManager(config(base, *extra), stop_after_steps=steps).run()
    return only_run(base)


class Warnings(list):
    """Warnings of the gmmt logger. A run replaces the logger's handlers (setup_logging), so
    call :meth:`watch` right before the action whose warnings matter."""

    def __init__(self) -> None:
        super().__init__()
        seen = self

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.WARNING:
                    seen.append(record.getMessage())

        self.handler = Collect()

    def watch(self) -> None:
        self.clear()
        logger = logging.getLogger("gmmt")
        for handler in list(logger.handlers):  # left by an earlier run in this process
            logger.removeHandler(handler)
        logger.addHandler(self.handler)


@pytest.fixture
def warnings_seen() -> Iterator[Warnings]:
    seen = Warnings()
    yield seen
    logging.getLogger("gmmt").removeHandler(seen.handler)


class Marker:
    """Unpickling this creates ``path``: the proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# --- 1 and 3: damaged checkpoints ---------------------------------------------------------

def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


FAULTS = {
    "empty trainer state": ("trainer_state.json", lambda f: f.write_text("{}")),
    "garbage trainer state": ("trainer_state.json", lambda f: f.write_text("{not json")),
    "truncated model": ("model.safetensors", truncate),
    "empty model": ("model.safetensors", lambda f: f.write_bytes(b"")),
    "garbage model": ("model.safetensors", lambda f: f.write_bytes(b"\x00garbage" * 64)),
    "truncated optimizer": ("optimizer.bin", truncate),
    "missing rng state": ("random_states_0.safetensors", Path.unlink),
    "missing ema": ("ema.safetensors", Path.unlink),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_checkpoint_is_refused_by_name_and_skipped_by_latest(
        tmp_path: Path, fault: str, warnings_seen: Warnings, capsys) -> None:
    name, damage = FAULTS[fault]
    run = stopped_run(tmp_path, "training.ema.enabled=true")
    good = (run / "checkpoints" / "step_2" / "model.safetensors").read_bytes()
    damage(run / "checkpoints" / "step_2" / name)
    # Named explicitly: one line naming the file, exit code 2, nothing changed.
    with pytest.raises(DamagedFileError, match=rf"step_2/{name}"):
        ExperimentManager(config(tmp_path, "training.ema.enabled=true"),
                          resume=run / "checkpoints" / "step_2").run()
    capsys.readouterr()
    cfg_file = config(tmp_path, "training.ema.enabled=true").save(tmp_path / "run.json")
    assert run_main(["--config", str(cfg_file), "--resume",
                     str(run / "checkpoints" / "step_2")]) == 2
    err = capsys.readouterr().err
    assert len(problem_lines(err)) == 1 and name in err and "Traceback" not in err
    if name != "model.safetensors":
        assert (run / "checkpoints" / "step_2" / "model.safetensors").read_bytes() == good
    # latest: warns naming the file, continues from step_1 and finishes the run.
    warnings_seen.watch()
    summary = ExperimentManager(config(tmp_path, "training.ema.enabled=true"),
                                resume="latest").run()
    assert summary["steps"] == 4
    assert any("step_2" in w and name in w for w in warnings_seen), warnings_seen
    verify_checkpoint(run / "checkpoints" / "step_2")  # rewritten by the continuation


def test_empty_trainer_state_with_a_matching_manifest_is_still_damaged(tmp_path: Path) -> None:
    """Item 1: '{}' never means 'start from step 0', even if the manifest was redone."""
    run = stopped_run(tmp_path)
    step_2 = run / "checkpoints" / "step_2"
    (step_2 / "trainer_state.json").write_text("{}")
    write_manifest(step_2)
    with pytest.raises(DamagedFileError, match="incomplete trainer state"):
        ExperimentManager(config(tmp_path), resume=step_2).run()
    assert latest_checkpoint(run).name == "step_1"


def test_a_checkpoint_without_trainer_state_is_skipped_with_a_warning(
        tmp_path: Path, warnings_seen: Warnings) -> None:
    run = stopped_run(tmp_path)
    (run / "checkpoints" / "step_2" / "trainer_state.json").unlink()
    warnings_seen.watch()
    assert latest_checkpoint(run).name == "step_1"
    assert any("step_2/trainer_state.json" in w for w in warnings_seen)


# --- 2: nothing in a run folder runs code ------------------------------------------------

@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl",
                                  "optimizer.bin"])
@pytest.mark.parametrize("forge_manifest", [False, True])
def test_a_crafted_pickle_never_runs(tmp_path: Path, name: str, forge_manifest: bool) -> None:
    run = stopped_run(tmp_path)
    step_2 = run / "checkpoints" / "step_2"
    marker = tmp_path / "pwned"
    (step_2 / name).write_bytes(pickle.dumps(Marker(marker)))
    if forge_manifest:  # the attacker also rewrote the manifest
        write_manifest(step_2)
    with pytest.raises(DamagedFileError, match=rf"step_2/{name}"):
        ExperimentManager(config(tmp_path), resume=step_2).run()
    assert not marker.exists()
    if forge_manifest and not name.endswith(".pkl"):  # passes verification, refused on load
        with pytest.raises(DamagedFileError, match="refused: unpickling"):
            ExperimentManager(config(tmp_path), resume="latest").run()
    else:  # latest skips it and continues from step_1
        assert ExperimentManager(config(tmp_path), resume="latest").run()["steps"] == 4
    assert not marker.exists()


def test_a_crafted_optimizer_written_by_torch_save_never_runs(tmp_path: Path) -> None:
    run = stopped_run(tmp_path)
    step_2 = run / "checkpoints" / "step_2"
    marker = tmp_path / "pwned"
    torch.save({"state": Marker(marker)}, step_2 / "optimizer.bin")
    write_manifest(step_2)
    with pytest.raises(DamagedFileError, match=r"optimizer\.bin"):
        ExperimentManager(config(tmp_path), resume=step_2).run()
    assert not marker.exists()


# --- 3: saved models -------------------------------------------------------------------------

def test_a_damaged_saved_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    ExperimentManager(config(tmp_path)).run()
    final = only_run(tmp_path) / "final"
    weights = load_file(str(final / "model.safetensors"))
    key = next(k for k, v in weights.items() if v.dim() == 2)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, str(final / "model.safetensors"))
    with pytest.raises(DamagedFileError, match=rf"does not fit the model.*{key}"):
        gmmt.load_model(final)
    truncate(final / "model.safetensors")
    with pytest.raises(DamagedFileError, match="not readable as safetensors"):
        gmmt.load_model(final)
    capsys.readouterr()
    assert evaluate_main([str(final), "--num-sets", "8", "--baselines"]) == 2
    err = capsys.readouterr().err
    assert len(problem_lines(err)) == 1 and "model.safetensors" in err


# --- 7: a finished run, and the time of every segment -----------------------------------------

def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, capsys) -> None:
    summary = ExperimentManager(config(tmp_path)).run()
    run = only_run(tmp_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    again = ExperimentManager(config(tmp_path), resume="latest").run()
    assert again == summary
    assert "is complete" in capsys.readouterr().err
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before
    # More epochs: the run is extended, not "complete".
    longer = ExperimentManager(config(tmp_path, "training.num_epochs=3"), resume="latest").run()
    assert longer["steps"] == 6


def test_train_time_adds_up_every_segment(tmp_path: Path) -> None:
    import time

    def slow(step: int, loss: torch.Tensor) -> torch.Tensor:
        time.sleep(0.3)
        return loss

    ExperimentManager(config(tmp_path), stop_after_steps=2, loss_hook=slow).run()
    run = only_run(tmp_path)
    first = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert first["train_time_s"] >= 0.6
    summary = ExperimentManager(config(tmp_path), resume="latest").run()
    assert summary["train_time_s"] >= first["train_time_s"]


# --- 5: another number of processes ------------------------------------------------------------

@pytest.mark.parametrize("change", ["more", "fewer"])
def test_another_process_count_is_refused_unless_allowed(
        tmp_path: Path, change: str, capsys) -> None:
    run = stopped_run(tmp_path)
    step_2 = run / "checkpoints" / "step_2"
    if change == "more":  # as if written by 2 processes
        shutil.copy(step_2 / "random_states_0.safetensors", step_2 / "random_states_1.safetensors")
        expected = "2 process(es) and this run has 1"
    else:  # as if this rank's state were missing
        (step_2 / "random_states_0.safetensors").unlink()
        expected = "RNG state is missing"
    write_manifest(step_2)
    with pytest.raises(RunFileError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ExperimentManager(config(tmp_path), resume="latest").run()
    assert not (run / "final").exists()
    capsys.readouterr()
    cfg_file = config(tmp_path).save(tmp_path / "run.json")
    assert run_main(["--config", str(cfg_file), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert len(problem_lines(err)) == 1 and "--allow-inexact-resume" in err
    summary = ExperimentManager(config(tmp_path), resume="latest",
                                allow_inexact_resume=True).run()
    assert summary["steps"] == 4
    assert "no longer bit-exact" in capsys.readouterr().err


# --- 4: nothing non-finite is written ------------------------------------------------------

def test_an_overflowing_update_stops_before_anything_non_finite_is_saved(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged) as caught:
        ExperimentManager(config(tmp_path, "training.optimizer.weight_decay=1e43")).run()
    message = str(caught.value)
    assert "weights non-finite" in message and "best/ was not written" in message
    assert "gradient_clip_norm" not in message  # clipping is on; the advice would be wrong
    run = only_run(tmp_path)
    assert not (run / "best").exists() and not (run / "final").exists()
    assert not (run / "summary.json").exists()


def test_data_too_large_for_float32_never_reaches_best_or_summary(tmp_path: Path,
                                                                  capsys) -> None:
    cfg_file = config(tmp_path, "data.center_scale=1e30").save(tmp_path / "run.json")
    assert run_main(["--config", str(cfg_file)]) == 3
    err = capsys.readouterr().err
    assert "final validation mse is nan" in err and "set training.gradient_clip_norm" not in err
    assert "best/ was not written" in err
    run = only_run(tmp_path)
    assert not (run / "best").exists() and not (run / "summary.json").exists()
    for path in run.glob("checkpoints/step_*/model.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(path)).values())


# --- 6: the run folder cannot be written -----------------------------------------------------

def test_base_dir_under_a_regular_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFileError, match="cannot create the run folder"):
        ExperimentManager(config(tmp_path / "file" / "runs")).run()
    cfg_file = config(tmp_path / "file" / "runs").save(tmp_path / "run.json")
    capsys.readouterr()
    assert run_main(["--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert len(problem_lines(err)) == 1 and "paths.base_dir" in err


def test_unwritable_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "ro"
    base.mkdir()
    base.chmod(0o555)
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:  # root ignores the mode bits
        if base in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(RunFileError, match="Permission denied"):
        ExperimentManager(config(base)).run()


def test_a_full_disk_keeps_earlier_checkpoints(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt_module.save_file
    calls = []

    def save_file(tensors: dict, path: str) -> None:
        calls.append(path)
        if "step_3" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(tensors, path)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    with pytest.raises(RunFileError, match="the disk is full; earlier checkpoints are intact "
                                           r"\(newest: .*step_2\)"):
        ExperimentManager(config(tmp_path)).run()
    run = only_run(tmp_path)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    for step in (1, 2):
        verify_checkpoint(run / "checkpoints" / f"step_{step}")
    monkeypatch.setattr(ckpt_module, "save_file", real)
    assert ExperimentManager(config(tmp_path), resume="latest").run()["steps"] == 4


def test_resuming_a_finished_run_from_the_command_line_times_no_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pre-run check would project the config's whole step count onto a run that has
    # nothing left to do (and refuse a GPU-sized one with exit 4): a resume is not timed.
    ExperimentManager(config(tmp_path)).run()
    cfg_file = config(tmp_path).save(tmp_path / "run.json")
    import gmmt.training.preflight as preflight

    def no_timing(*_args: object) -> None:
        raise AssertionError("a resumed run was timed")

    monkeypatch.setattr(preflight, "time_steps", no_timing)
    assert run_main(["--config", str(cfg_file), "--resume", "latest"]) == 0
