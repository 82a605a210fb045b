"""Every experiment preset end to end through ``python -m gmmt.run``, shrunk with ``--set`` to
seconds (width 16, 2 layers, 4 steps, 30-60 points, 8 validation sets, a few Gibbs sweeps) but
on its own code paths: its precision (bf16 autocast on CPU), EMA, clipping, repetition mode,
curriculum, validation preset with its baselines and plots, plus gradient accumulation. Then
the multi-process paths: two CPU processes, two launchers acting as two machines, and SIGTERM
to the launcher or to one rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmmt.config.presets import resolve_config
from gmmt.training.checkpoint import latest_checkpoint, step_checkpoints

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# Sizes only: what makes each preset what it is stays (precision, EMA, clipping, repetition,
# curriculum kind, validation preset, its baselines and plots).
SHRINK = [
    "model.transformer.hidden_dim=16", "model.transformer.num_heads=2",
    "model.transformer.num_layers=2",
    "training.num_epochs=2", "training.steps_per_epoch=2", "training.batch_size=2",
    "training.gradient_accumulation_steps=2", "training.scheduler.warmup_steps=1",
    "training.checkpointing.every_n_steps=2",
    'data.sample_count_distribution={"type": "uniform", "min": 30, "max": 60}',
    "validation.num_sets=8", "validation.batch_size=4", "validation.every_n_steps=2",
    "validation.bayes.burn_in=3", "validation.bayes.num_samples=5",
    "validation.bayes.num_chains=2",
    "validation.em.n_init=1", "validation.em.tied_n_init=1", "validation.em.max_iter=10",
    "logging.wandb.enabled=false", "logging.progress_bar=false", "logging.log_every_n_steps=1",
]
# Per preset: what else must shrink for the run to stay valid (a curriculum within 4 steps).
CPU_CURRICULUM = ["training.curriculum.steps=2",
                  'training.curriculum.sample_count_distribution='
                  '{"type": "uniform", "min": 20, "max": 30}']
EXTRA = {"cpu_reference": CPU_CURRICULUM, "cpu_standard_small": CPU_CURRICULUM,
         "cpu_wide": CPU_CURRICULUM}
PRESETS = ("quick_test", "standard", "high_performance", "cpu_reference", "cpu_standard_small",
           "cpu_wide")


def preset_args(preset: str, base: Path, *extra: str) -> list[str]:
    sets = [*SHRINK, f"paths.base_dir={base}", *EXTRA.get(preset, []), *extra]
    return ["--preset", preset, "--allow-slow", *(a for s in sets for a in ("--set", s))]


def env(**more: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **more}


def only_run(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


def check_finished(run: Path, preset: str) -> dict:
    """The run folder of a finished shrunk run of ``preset``: its validation, plots, EMA."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 4
    cfg = resolve_config(preset).config
    saved = json.loads((run / "config.json").read_text())
    assert saved["metadata"]["preset"] == preset
    assert saved["training"]["gradient_accumulation_steps"] == 2
    refined = ["refined", "refined_told_k"] if cfg.model.refinement.enabled else []
    assert set(summary["baselines"]) == set(cfg.validation.baselines + refined)
    if cfg.model.count_head.enabled:  # the model's K is its head's, scored when asked for
        assert ("k_accuracy" in summary["model"]) == ("k_accuracy" in cfg.validation.metrics)
    assert all(0 < summary["model"][m] < float("inf") for m in ("mse", "mse_over_noise"))
    vis = cfg.validation.visualization
    plots = {p.name for p in (run / "plots").glob("*.png")} if vis.enabled else set()
    assert plots == ({f"{p}.png" for p in vis.plots} if vis.enabled else set())
    assert (run / "final" / "model.safetensors").is_file()
    assert (latest_checkpoint(run) / "ema.safetensors").is_file() == cfg.training.ema.enabled
    return summary


def test_every_experiment_preset_is_covered() -> None:
    from gmmt.config.presets import list_experiment_presets

    assert set(list_experiment_presets()) == set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end_shrunk(tmp_path: Path, preset: str) -> None:
    result = subprocess.run([sys.executable, "-m", "gmmt.run", *preset_args(
        preset, tmp_path / "runs", "device.device=cpu")], cwd=tmp_path, env=env(),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    check_finished(run, preset)
    cfg = resolve_config(preset).config
    saved = json.loads((run / "config.json").read_text())
    assert saved["device"]["mixed_precision"] == cfg.device.mixed_precision
    assert saved["model"]["transformer"]["repetition"]["mode"] == (
        cfg.model.transformer.repetition.mode)
    log = (run / "train.log").read_text()
    assert f"precision {cfg.device.mixed_precision}" in log
    if "bayes" in cfg.validation.baselines:
        assert "bayes" in log and "excess_over_bayes" in log


@pytest.mark.slow
def test_standard_as_two_cpu_processes(tmp_path: Path) -> None:
    result = subprocess.run(
        [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
         "-m", "gmmt.run", *preset_args("standard", tmp_path / "runs")],
        cwd=tmp_path, env=env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_finished(only_run(tmp_path / "runs"), "standard")
    assert summary["ranks_in_sync"] is True


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_high_performance_as_two_machines(tmp_path: Path) -> None:
    """launch/multi_node.yaml with two launchers on this machine, one CPU process each."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "multi_node.yaml"),
         "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
         "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "-m", "gmmt.run", *preset_args("high_performance", tmp_path / "runs")],
        cwd=tmp_path, env=env(ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        errors.append((proc.returncode, err[-3000:]))
    assert all(rc == 0 for rc, _ in errors), errors
    summary = check_finished(only_run(tmp_path / "runs"), "high_performance")
    assert summary["ranks_in_sync"] is True


def start_two_processes(tmp_path: Path, launcher: list[str]) -> subprocess.Popen:
    """A long shrunk standard run on two CPU processes; returns once a step is logged."""
    proc = subprocess.Popen(
        [*launcher, "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"), "-m", "gmmt.run",
         *preset_args("standard", tmp_path / "runs", "training.num_epochs=500",
                      "training.checkpointing.every_n_steps=0")],
        cwd=tmp_path, env=env(ACCELERATE_USE_CPU="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    end = time.time() + 120
    while not any((r / "metrics.jsonl").exists() and (r / "metrics.jsonl").stat().st_size
                  for r in (tmp_path / "runs").glob("*")):
        assert proc.poll() is None and time.time() < end, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    return proc


def check_stopped(tmp_path: Path) -> dict:
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM"
    assert 0 < summary["steps"] < summary["total_steps"]
    assert step_checkpoints(run)[-1][1].name == f"step_{summary['steps']}"
    assert {p.name for p in latest_checkpoint(run).iterdir()} >= {
        "random_states_0.safetensors", "random_states_1.safetensors"}
    return summary


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_ends_in_one_line(tmp_path: Path) -> None:
    proc = start_two_processes(tmp_path, [sys.executable, "-m", "gmmt.launcher"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    assert err.count("launcher stopped by SIGTERM") == 1
    assert err.count("resume with --resume latest") == 1  # rank 0's line only
    check_stopped(tmp_path)


@pytest.mark.slow
def test_sigterm_to_one_rank_is_recorded_as_sigterm(tmp_path: Path) -> None:
    proc = start_two_processes(tmp_path, [ACCELERATE, "launch"])
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)],
                              capture_output=True, text=True).stdout.split()
    rank1 = [int(pid) for pid in children if "RANK=1" in
             Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")]
    assert len(rank1) == 1, children
    os.kill(rank1[0], signal.SIGTERM)  # rank 0, which writes summary.json, is not told
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    check_stopped(tmp_path)
