"""The trainer on CPU: run folder, exact resume, crash safety, NaN guard, trackers."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import helpers
import pytest
import torch
from safetensors.torch import load_file

import gmmt
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.presets import PresetStore
from gmmt.data.gmm import TRAIN_STREAM, GMMSampler
from gmmt.training.checkpoint import latest_checkpoint, step_checkpoints
from gmmt.training.experiment import ExperimentManager, TrainingDiverged, build_accelerator
from gmmt.training.optim import build_optimizer, lr_factor


def small_config(base_dir: Path, *extra: str, model: str | None = None) -> ExperimentConfig:
    """The shared shrunk quick_test, checkpointing every step and logging every step."""
    return helpers.small_config(
        base_dir, "training.checkpointing.every_n_steps=1",
        "training.checkpointing.keep_last=10", "logging.log_every_n_steps=1", *extra,
        model=model)


def only_run(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_run_writes_the_run_folder(tmp_path: Path) -> None:
    summary = ExperimentManager(small_config(tmp_path)).run()
    run = only_run(tmp_path)
    for name in ("config.json", "train.log", "metrics.jsonl", "summary.json",
                 "best/model.safetensors", "best/config.json", "final/model.safetensors",
                 "final/config.json"):
        assert (run / name).exists(), name
    assert not (run / "plots").exists()  # plots are off in small_config: no empty folder
    assert [s for s, _ in step_checkpoints(run)] == [1, 2, 3, 4]
    files = {p.name for p in latest_checkpoint(run).iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.safetensors",
            "trainer_state.json", "config.json", "manifest.json"} <= files
    assert not any(name.endswith(".pkl") for name in files)  # nothing to unpickle on resume
    assert ExperimentConfig.load(latest_checkpoint(run) / "config.json") == small_config(tmp_path)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["steps"] == 4 and summary["model"]["mse"] > 0
    assert ExperimentConfig.load(run / "config.json") == small_config(tmp_path)
    assert [s for s, _ in logged(run, "train/loss")] == [1, 2, 3, 4]
    # The exported model is loadable without pickle and is the trained one.
    model = gmmt.load_model(run / "final")
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    ExperimentManager(small_config(straight)).run()
    split = tmp_path / "split"
    first = ExperimentManager(small_config(split), stop_after_steps=2).run()
    assert first["steps"] == 2 and first["stopped_by"] == "stop_after_steps"
    assert not (only_run(split) / "final").exists()
    ExperimentManager(small_config(split), resume="latest").run()
    a = load_file(str(only_run(straight) / "final" / "model.safetensors"))
    b = load_file(str(only_run(split) / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged(only_run(straight), "train/loss") == logged(only_run(split), "train/loss")
    assert logged(only_run(straight), "train/lr") == logged(only_run(split), "train/lr")


def test_resume_locks_model_and_data_but_allows_epochs(tmp_path: Path) -> None:
    ExperimentManager(small_config(tmp_path), stop_after_steps=2).run()
    with pytest.raises(ConfigError, match=r"model\.transformer\.hidden_dim is locked on resume"):
        ExperimentManager(small_config(tmp_path, "model.transformer.hidden_dim=64"),
                          resume="latest").run()
    with pytest.raises(ConfigError, match=r"device\.seed is locked"):
        ExperimentManager(small_config(tmp_path, "device.seed=1"), resume="latest").run()
    summary = ExperimentManager(small_config(tmp_path, "training.num_epochs=3"),
                                resume="latest").run()
    assert summary["steps"] == 6
    assert "training.num_epochs: 2 -> 3" in (only_run(tmp_path) / "train.log").read_text()


def test_nothing_to_resume(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run of 't' with a checkpoint"):
        ExperimentManager(small_config(tmp_path), resume="latest").run()


def test_nan_steps_are_skipped_then_stop_with_a_clear_error(tmp_path: Path) -> None:
    nan_at = {1, 2}

    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in nan_at else loss

    summary = ExperimentManager(small_config(tmp_path / "a"), loss_hook=poison).run()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 4
    assert all(torch.isfinite(v).all() for v in
               load_file(str(only_run(tmp_path / "a") / "final" / "model.safetensors")).values())

    def always(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("inf") if step >= 2 else loss

    cfg = small_config(tmp_path / "b", "training.max_nonfinite_steps=2",
                       "training.num_epochs=5")
    with pytest.raises(TrainingDiverged, match="NaN/inf for 2 steps in a row"):
        ExperimentManager(cfg, loss_hook=always).run()
    run = only_run(tmp_path / "b")
    # Checkpoints stop before the bad steps; none holds non-finite weights.
    assert max(s for s, _ in step_checkpoints(run)) <= 3
    for _, ckpt in step_checkpoints(run):
        assert all(torch.isfinite(v).all()
                   for v in load_file(str(ckpt / "model.safetensors")).values())


def test_incomplete_checkpoints_are_never_latest(tmp_path: Path) -> None:
    ExperimentManager(small_config(tmp_path), stop_after_steps=2).run()
    run = only_run(tmp_path)
    (run / "checkpoints" / ".tmp-step_3").mkdir()  # a write cut short
    (run / "checkpoints" / ".tmp-step_3" / "model.safetensors").write_bytes(b"partial")
    (run / "checkpoints" / "step_9").mkdir()  # no trainer state: not complete
    assert latest_checkpoint(run).name == "step_2"
    summary = ExperimentManager(small_config(tmp_path), resume=run).run()
    assert summary["steps"] == 4
    assert not (run / "checkpoints" / ".tmp-step_3").exists()  # cleaned up


def test_early_stopping(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "training.num_epochs=20", "validation.every_n_steps=1",
                       "training.early_stopping.enabled=true",
                       "training.early_stopping.patience=1",
                       "training.early_stopping.min_delta=1000")  # nothing counts as better
    summary = ExperimentManager(cfg).run()
    assert summary["stopped_by"] == "early stopping" and summary["steps"] == 2
    assert (only_run(tmp_path) / "final" / "model.safetensors").exists()


def test_ema_weights_are_saved_and_resumed(tmp_path: Path) -> None:
    extra = ("training.ema.enabled=true", "training.ema.decay=0.5")
    straight = ExperimentManager(small_config(tmp_path / "a", *extra)).run()
    ExperimentManager(small_config(tmp_path / "b", *extra), stop_after_steps=3).run()
    resumed = ExperimentManager(small_config(tmp_path / "b", *extra), resume="latest").run()
    assert straight["model"] == resumed["model"]


@pytest.mark.parametrize(("extra", "message"), [
    (("device.device=cuda",), "no CUDA GPU is visible"),
    (("device.device=tpu",), "needs torch_xla"),
    (("device.device=auto", "device.mixed_precision=fp16"), "fp16 needs a CUDA GPU"),
])
def test_accelerator_config_errors(tmp_path: Path, extra: tuple, message: str) -> None:
    if torch.cuda.is_available():
        pytest.xfail("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        build_accelerator(small_config(tmp_path, *extra))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_schedule_and_parameter_groups() -> None:
    cfg = small_config(Path("unused")).training
    cfg.scheduler.warmup_steps = 10
    cfg.scheduler.min_lr_ratio = 0.1
    factors = [lr_factor(s, cfg.scheduler, 110) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    from gmmt.model.build import build_model

    model = build_model(small_config(Path("unused")).model, 2)
    decay, no_decay = build_optimizer(model, cfg.optimizer).param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def run_cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gmmt.run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "runs", "training.num_epochs=200")
    cfg_file = cfg.save(tmp_path / "run.json")
    proc = run_cli(["--config", str(cfg_file)], tmp_path)
    wait_for(lambda: (tmp_path / "runs").exists() and any(
        step_checkpoints(r) for r in (tmp_path / "runs").iterdir()))
    proc.kill()
    proc.wait()
    run = only_run(tmp_path / "runs")
    done = latest_checkpoint(run)
    assert done is not None
    resumed = run_cli(["--config", str(cfg_file), "--resume", "latest",
                       "--set", "training.num_epochs=3"], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "runs", "training.num_epochs=500",
                       "training.checkpointing.every_n_steps=0")
    cfg_file = cfg.save(tmp_path / "run.json")
    proc = run_cli(["--config", str(cfg_file)], tmp_path)
    wait_for(lambda: (tmp_path / "runs").exists() and any(
        (r / "metrics.jsonl").exists() and (r / "metrics.jsonl").stat().st_size > 0
        for r in (tmp_path / "runs").iterdir()))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume with --resume latest" in err
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM"
    # The checkpoint is the step the signal arrived at, before the run's end.
    assert latest_checkpoint(run).name == f"step_{summary['steps']}"
    assert 0 < summary["steps"] < summary["total_steps"]
    assert "Traceback" not in err


# What makes each model variant what it is, seen in the model rebuilt from its saved files,
# and the weights of that feature, which training must move.
VARIANT_FEATURES: dict[str, tuple[Callable[[torch.nn.Module], bool], str]] = {
    "small_cycle": (lambda m: m.schedule == [0, 1, 2, 3] * 2, "blocks.3."),
    "small_layerwise": (lambda m: m.schedule == [0, 0, 1, 1, 2, 2, 3, 3], "blocks.3."),
    "small_grouped": (lambda m: m.schedule == [0, 0, 0, 1, 2, 3, 3], "blocks.3."),
    "small_flow": (lambda m: m.flow is not None and m.flow.snr_source == "estimated", "flow."),
    "small_rf": (lambda m: m.blocks[0].attn.kind == "random_feature", "blocks.0.attn.qkv."),
    "orthogonal": (lambda m: hasattr(m.codec, "basis"), "codec.gain"),
    "count_head": (lambda m: m.count_head is not None and m.max_components == 4, "count_head."),
}
# Variants that are settings of the small model rather than presets.
VARIANT_SETTINGS = {"orthogonal": ["model.encoder=orthogonal"],
                    "count_head": ["model.count_head.enabled=true",
                                   "model.refinement.enabled=true",
                                   'validation.metrics=["mse", "k_accuracy"]']}
MODEL_SIZES = ("tiny", "small", "medium", "large")


def test_every_model_variant_preset_is_covered() -> None:
    variants = set(PresetStore().names("model")) - set(MODEL_SIZES)
    assert variants == set(VARIANT_FEATURES) - set(VARIANT_SETTINGS), (
        "a model preset that is neither a size nor a variant tested below")


@pytest.mark.parametrize("variant", sorted(VARIANT_FEATURES))
def test_model_variant_trains_saves_and_reloads(tmp_path: Path, variant: str) -> None:
    extra = VARIANT_SETTINGS.get(variant, [])
    config = small_config(tmp_path, "training.loss.target=labelled_posterior_mean", *extra,
                          model="small" if extra else variant)
    summary = ExperimentManager(config).run()
    assert summary["steps"] == 4 and 0 < summary["model"]["mse"] < float("inf")
    if variant == "count_head":  # validation scored its K and the refined model
        assert 0 <= summary["model"]["k_accuracy"] <= 1
        assert {"refined", "refined_told_k"} <= set(summary["baselines"])
    run = only_run(tmp_path)
    model = gmmt.load_model(run / "final")
    is_variant, own_weights = VARIANT_FEATURES[variant]
    assert is_variant(model)
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # Steps 2-4 moved the variant's own weights (the step-1 checkpoint holds them before).
    after_one = load_file(str(step_checkpoints(run)[0][1] / "model.safetensors"))
    own = [k for k in weights if k.startswith(own_weights)]
    assert own and all(not torch.equal(after_one[k], weights[k]) for k in own
                       if weights[k].dtype.is_floating_point and "features" not in k)


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "runs", "device.device=auto", "logging.wandb.enabled=true")
    cfg_file = cfg.save(tmp_path / "run.json")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
         "-m", "gmmt.run", "--config", str(cfg_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path / "runs")  # one run folder, not one per process
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 4
    # Only rank 0 logs: one line per logged step, one validation line per validation.
    assert [s for s, _ in logged(run, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in logged(run, "val/mse")] == [2, 4]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert {p.name for p in latest_checkpoint(run).iterdir()} >= {
        "random_states_0.safetensors", "random_states_1.safetensors", "model.safetensors"}
    # The schedule counts optimizer steps, not steps times processes.
    lr = dict(logged(run, "train/lr"))
    assert lr[1] == pytest.approx(cfg.training.optimizer.lr * lr_factor(
        1, cfg.training.scheduler, cfg.training.total_steps))


@pytest.mark.slow
def test_quick_test_preset_end_to_end(tmp_path: Path) -> None:
    """The README's first command: quick_test on CPU, wandb offline, in under 90 s."""
    start = time.time()
    proc = run_cli(["--preset", "quick_test", "--device", "cpu"], tmp_path)
    _, err = proc.communicate(timeout=300)
    elapsed = time.time() - start
    assert proc.returncode == 0, err[-3000:]
    assert elapsed < 90, f"quick_test took {elapsed:.0f} s"
    run = only_run(tmp_path / "runs")
    for name in ("config.json", "train.log", "metrics.jsonl", "summary.json",
                 "best/model.safetensors", "final/model.safetensors", "final/config.json"):
        assert (run / name).is_file(), name
    assert step_checkpoints(run)
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb"))
    summary = json.loads((run / "summary.json").read_text())
    # Identity (x itself) scores mse_over_noise = 1 in expectation: the model must be well below.
    assert summary["model"]["mse_over_noise"] < 0.5
    assert '"preset": "quick_test"' in (run / "config.json").read_text()


def test_wandb_offline_resumes_the_same_run_id(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = small_config(tmp_path, "logging.wandb.enabled=true")
    ExperimentManager(cfg, stop_after_steps=2).run()
    run = only_run(tmp_path)
    run_id = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["wandb_run_id"]
    ExperimentManager(cfg, resume="latest").run()
    # One folder per invocation (named by the second it started: two fast invocations may
    # share one), all inside the run folder and all with the run's id.
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) in (1, 2)
    assert all(f"-{run_id}" in p.name for p in offline_runs)  # "-1" added on a clash
    assert not (tmp_path / "wandb").exists() and not Path("wandb").exists()


def test_missing_tensorboard_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard package"):
            ExperimentManager(small_config(tmp_path, "logging.tensorboard=true")).run()
        assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder made
    else:
        ExperimentManager(small_config(tmp_path, "logging.tensorboard=true")).run()
        assert list(only_run(tmp_path).glob("tensorboard/events.*"))


def test_launch_configs_are_valid_accelerate_configs() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((REPO / "launch").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = (config.distributed_type.value, config.num_processes)
    assert kinds["cpu_2proc"] == ("MULTI_GPU", 2)
    assert kinds["single_gpu"][0] == "NO" and kinds["multi_gpu"][0] == "MULTI_GPU"
    assert kinds["fsdp"][0] == "FSDP" and kinds["tpu"][0] == "XLA"
    assert kinds["multi_node"][0] == "MULTI_GPU"
    script = (REPO / "launch" / "slurm_multinode.sbatch").read_text()
    assert "python -m gmmt.launcher" in script and "--resume latest" in script
    subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm_multinode.sbatch")], check=True)


def test_ragged_sets_train(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "data.ragged=true",
                       'data.sample_count_distribution={"type": "uniform", "min": 20, "max": 40}')
    summary = ExperimentManager(cfg).run()
    assert summary["steps"] == 4 and 0 < summary["model"]["mse"] < float("inf")
    rates = [r for _, r in logged(only_run(tmp_path), "train/points_per_s")]
    assert len(rates) == 4 and all(r > 0 for r in rates)


def test_curriculum_draws_small_sets_first_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[str, int, int]] = []  # (stream, step, points per set)
    real_batch = GMMSampler.batch

    def recording_batch(self, step, batch_size, rank=0, stream=TRAIN_STREAM):
        batch = real_batch(self, step, batch_size, rank, stream)
        drawn.append((stream, step, batch.points.shape[1]))
        return batch

    monkeypatch.setattr(GMMSampler, "batch", recording_batch)
    curriculum = ("training.curriculum.steps=3", "logging.log_every_n_steps=10",
                  'training.curriculum.sample_count_distribution={"type": "fixed", "value": 10}')
    ExperimentManager(small_config(tmp_path / "straight", *curriculum)).run()
    train = [(step, n) for stream, step, n in drawn if stream == TRAIN_STREAM]
    assert train == [(0, 10), (1, 10), (2, 10), (3, 40)]
    assert {n for stream, _, n in drawn if stream != TRAIN_STREAM} == {40}  # validation: data
    assert "curriculum done at step 3" in (only_run(tmp_path / "straight") / "train.log"
                                           ).read_text()
    # Logged every 10 steps, a window still ends where the curriculum does.
    assert logged(only_run(tmp_path / "straight"), "train/curriculum") == [(3, 1.0), (4, 0.0)]

    # Stopped inside the curriculum and resumed, the run is the same run.
    split = tmp_path / "split"
    ExperimentManager(small_config(split, *curriculum), stop_after_steps=2).run()
    ExperimentManager(small_config(split, *curriculum), resume="latest").run()
    a = load_file(str(only_run(tmp_path / "straight") / "final" / "model.safetensors"))
    b = load_file(str(only_run(split) / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_curriculum_of_larger_sets_is_warned_about(tmp_path: Path) -> None:
    ExperimentManager(small_config(
        tmp_path, "training.curriculum.steps=1",
        'training.curriculum.sample_count_distribution={"type": "fixed", "value": 60}'),
        stop_after_steps=1).run()
    assert "up to 60 points per set, more than the data prior's 40" in (
        only_run(tmp_path) / "train.log").read_text()


SHRINK = ["--device", "cpu", "--set", "training.num_epochs=2", "--set",
          "training.steps_per_epoch=2", "--set", "training.batch_size=4", "--set",
          'data.sample_count_distribution={"type": "fixed", "value": 40}', "--set",
          "validation.num_sets=8", "--set", "validation.batch_size=4", "--set",
          "training.scheduler.warmup_steps=1", "--set", "logging.wandb.enabled=false",
          "--set", "logging.progress_bar=false"]


def test_bare_resume_continues_with_the_runs_own_config(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from gmmt.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "quick_test", *SHRINK, "--stop-after-steps", "2"]) == 0
    # No preset, no --set: the run's saved config is the base, not quick_test's defaults.
    assert main(["--resume", "latest"]) == 0
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["total_steps"]) == (4, 4)
    assert ExperimentConfig.load(run / "config.json").training.steps_per_epoch == 2
    # Changing the validation bank on resume is refused (best/ compares across the run).
    assert main(["--resume", "latest", "--set", "validation.num_sets=16"]) == 2
