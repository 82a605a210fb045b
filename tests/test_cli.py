"""The command line, as a user runs it: output, exit codes, no tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmmt.run import main


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) \
        -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gmmt.run", *args], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=120)


def test_list_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in ("quick_test", "standard", "high_performance"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2  # the name is followed by its description
    for name in ("small_flow", "small_rf", "comprehensive", "few", "difficult", "fixed_500"):
        assert name in out


def test_print_config_shows_value_and_diff(capsys: pytest.CaptureFixture) -> None:
    code = main(["--print-config", "--preset", "standard", "--set",
                 "training.optimizer.lr=0.0002"])
    captured = capsys.readouterr()
    assert code == 0
    # stdout is the config alone (redirect it to a file and --config it back); the summary
    # goes to stderr.
    assert json.loads(captured.out)["training"]["optimizer"]["lr"] == 0.0002
    summary = captured.err
    assert "training.optimizer.lr: 0.0005 -> 0.0002" in summary
    assert "overrides: training.optimizer.lr=0.0002" in summary


def test_describe_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["--describe-preset", "high_performance"]) == 0
    out = capsys.readouterr().out
    assert "large" in out and "optimized" in out and "bf16" in out
    assert main(["--describe-preset", "model:small_flow"]) == 0
    body = capsys.readouterr().out.split("\n", 1)[1]
    assert json.loads(body)["transformer"]["flow"]["enabled"] is True


def test_schema_describes_the_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    lr = schema["$defs"]["OptimizerConfig"]["properties"]["lr"]
    assert lr["type"] == "number" and lr["exclusiveMinimum"] == 0 and lr["description"]
    assert schema["$defs"]["TrainingConfig"]["additionalProperties"] is False
    assert set(schema["properties"]) == {"metadata", "paths", "device", "model", "training",
                                         "data", "validation", "logging"}


def test_dry_run_mix_and_match(capsys: pytest.CaptureFixture) -> None:
    # --allow-slow: on a CPU with less than ~60 GiB free this mix is refused (exit 4)
    code = main(["--dry-run", "--model-preset", "medium", "--training-preset", "standard",
                 "--data-preset", "complex", "--validation-preset", "comprehensive",
                 "--allow-slow"])
    out = capsys.readouterr().out
    assert code == 0
    assert "components: model=medium, training=standard, data=complex" in out


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "training.num_epochs=abc"], "expected int, got str 'abc' @ $.training.num_epochs"),
    (["--set", "training.learning_rat=1"], "extra fields found (learning_rat"),
    (["--preset", "standrd"], "unknown experiment preset 'standrd' (did you mean 'standard'?)"),
    (["--set", "data.cluster_params.min=9"], "must be <= max (4) @ $.data.cluster_params.min"),
    (["--set", "training"], "--set expects KEY.PATH=VALUE"),
    (["--device", "gpu"], "expected one of 'auto', 'cpu', 'cuda', 'mps', 'tpu'; got 'gpu'"),
])
def test_bad_input_exits_2_without_traceback(args: list[str], expected: str,
                                             tmp_path: Path) -> None:
    result = run_cli(*args, "--print-config", cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_preset_file_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "presets" / "experiments" / "mine.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"mine": {"model": "tiny",, "training": "quick"}}')
    result = run_cli("--config-dir", str(tmp_path / "presets"), "--list-presets")
    assert result.returncode == 2
    assert f"{broken}:1:27" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--preset", "standard", "--print-config",
                     env={"GMMT_CONFIG_PATH": str(tmp_path / "presets")})
    assert result.returncode == 2 and str(broken) in result.stderr


def test_bad_config_file(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"training": {"batch_size": "8"}}')
    result = run_cli("--config", str(tmp_path / "run.json"), "--print-config")
    assert result.returncode == 2
    assert "expected int, got str '8' @ $.training.batch_size" in result.stderr
    result = run_cli("--config", str(tmp_path / "missing.json"), "--print-config")
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_help_explains_layers() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("--preset", "--set", "--config-dir", "--resume", "--schema", "layers"):
        assert text in result.stdout


@pytest.mark.parametrize(("body", "extra", "expected"), [
    ({"metadata": 5}, [], "expected an object (MetadataConfig), got int 5 @ $.metadata"),
    ({"metadata": [1]}, [], "expected an object (MetadataConfig), got list [1] @ $.metadata"),
    ({"paths": "runs"}, [], "expected an object (PathsConfig), got str 'runs' @ $.paths"),
    # a later layer's object must not paper over the file's mistake
    ({"model": 5}, ["--set", "model.hidden_dim=64"],
     "expected an object (ModelConfig), got int 5 @ $.model"),
    ({"device": True}, ["--seed", "3"], "expected an object (DeviceConfig), got bool True"),
])
def test_section_of_wrong_type_in_config_file_fails(body: dict, extra: list[str], expected: str,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "run.json"
    file.write_text(json.dumps(body))
    for preset in ([], ["--preset", "quick_test"]):  # file alone, and over a preset
        assert main(["--config", str(file), *preset, *extra, "--print-config"]) == 2
        captured = capsys.readouterr()
        assert expected in captured.err and captured.out == ""


def test_section_of_wrong_type_in_set_fails(capsys: pytest.CaptureFixture) -> None:
    assert main(["--set", "metadata=5", "--print-config"]) == 2
    assert ("--set metadata=5: expected an object (MetadataConfig), got int 5 @ $.metadata"
            in capsys.readouterr().err)
    # a leaf given an object is still the leaf's own type error
    assert main(["--set", "metadata.exp_name={}", "--print-config"]) == 2
    assert "expected str, got dict {} @ $.metadata.exp_name" in capsys.readouterr().err


# --- the machine check before a run (gmmt.training.preflight) --------------------------------

SMALL = ["--preset", "quick_test", "--device", "cpu", "--set", "training.num_epochs=1",
         "--set", "training.steps_per_epoch=2", "--set", "training.batch_size=2",
         "--set", "training.scheduler.warmup_steps=1", "--set", "validation.num_sets=4",
         "--set", "validation.every_n_steps=0", "--set", "logging.wandb.enabled=false",
         "--set", "validation.visualization.enabled=false"]


def test_a_run_too_slow_for_this_cpu_stops_with_advice(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    args = [*SMALL, "--set", f"paths.base_dir={tmp_path}", "--set",
            "training.max_cpu_hours=1e-9"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "steps project to about" in err and "more than training.max_cpu_hours=1e-09" in err
    assert "--preset quick_test" in err and "--allow-slow" in err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []  # nothing written
    assert main([*args, "--allow-slow"]) == 0  # the user insists
    assert len(list(tmp_path.iterdir())) == 1


def test_a_fast_enough_run_prints_its_projection(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main([*SMALL, "--set", f"paths.base_dir={tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert "gmmt: time: 2 steps project to about" in err and "gmmt: memory: about" in err


def test_a_step_bigger_than_memory_is_refused_at_once(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    huge = [*SMALL, "--set", f"paths.base_dir={tmp_path}", "--set",
            "training.batch_size=10000000"]
    for args in (huge, [*huge, "--dry-run"]):
        assert main(args) == 4
        err = capsys.readouterr().err
        assert "one training step needs about" in err and "available" in err
        assert "--allow-slow" in err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_dry_run_of_a_gpu_preset_answers_in_seconds(capsys: pytest.CaptureFixture) -> None:
    import time

    start = time.time()
    assert main(["--preset", "high_performance", "--dry-run", "--allow-slow"]) == 0
    elapsed = time.time() - start
    out = capsys.readouterr().out
    assert "37,910,274 parameters" in out and "memory: about" in out
    assert "dry run: config valid" in out
    assert elapsed < 20, f"dry run took {elapsed:.0f} s"


def test_dry_run_checks_device_and_precision(capsys: pytest.CaptureFixture) -> None:
    import torch

    if not torch.cuda.is_available():
        assert main(["--dry-run", "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible @ $.device.device" in capsys.readouterr().err
        assert main(["--dry-run", "--set", "device.mixed_precision=fp16"]) == 2
        assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert main(["--dry-run", "--device", "cpu", "--set", "device.mixed_precision=true"]) == 0


def test_print_launch_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["--print-launch-config"]) == 0
    names = capsys.readouterr().out.split()
    assert "multi_gpu" in names and "cpu_2proc" in names
    assert main(["--print-launch-config", "multi_gpu"]) == 0
    assert "num_processes" in capsys.readouterr().out
    assert main(["--print-launch-config", "nope"]) == 2
    assert "unknown launch config 'nope'" in capsys.readouterr().err


def test_dry_run_falls_back_to_the_cpu_where_the_meta_device_cannot_run(
        capsys: pytest.CaptureFixture) -> None:
    """cpu_reference's principal-axes frame (an eigendecomposition) has no meta kernel: the
    dry run's forward pass then runs on the CPU and still answers with the output shape."""
    assert main(["--preset", "cpu_reference", "--dry-run"]) == 0
    assert "output (2, 8, 2)" in capsys.readouterr().out
