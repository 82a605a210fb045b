"""A non-editable install ships every preset and works from an unrelated directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gmmt.config.presets import PresetStore

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_finds_every_preset(tmp_path: Path) -> None:
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: setuptools writes build/ and gmmt.egg-info/ next to the sources.
    source_copy = tmp_path / "src"
    shutil.copytree(REPO, source_copy, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", "wandb"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source_copy), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheel_dir)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("gmmt-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    script = (
        "import gmmt, json\n"
        "from pathlib import Path\n"
        "from gmmt.config.presets import PresetStore, get_preset_config\n"
        "s = PresetStore()\n"
        "print(json.dumps({'file': gmmt.__file__, 'kinds': {k: s.names(k) for k in "
        "['experiments', 'model', 'training', 'data', 'validation', "
        "'data_params/cluster_params', 'data_params/snr_db_params', "
        "'data_params/sample_count_distribution']}, "
        "'hp': get_preset_config('high_performance').model.transformer.num_layers, "
        "'launch': sorted(p.name for p in (Path(gmmt.__file__).parent / 'launch').iterdir())"
        "}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    found = json.loads(out)
    assert Path(found["file"]).is_relative_to(target)  # the installed copy, not the checkout
    source = REPO / "gmmt" / "configs"
    for kind, names in found["kinds"].items():
        assert names == PresetStore([source]).names(kind), kind
        assert names
    assert found["hp"] == 48
    # The accelerate launch recipes ship too (gmmt --print-launch-config NAME prints one).
    assert found["launch"] == sorted(p.name for p in (REPO / "gmmt" / "launch").iterdir())
    assert "multi_gpu.yaml" in found["launch"]
    # The console script is declared.
    assert "gmmt = gmmt.run:main" in (REPO / "setup.cfg").read_text()


def test_the_public_api_is_one_import_and_shows_only_public_names() -> None:
    # A fresh interpreter: importing gmmt must not drag in torch until a model is needed.
    script = (
        "import json, sys, gmmt\n"
        "names, light = dir(gmmt), 'torch' not in sys.modules\n"
        "from gmmt import ExperimentConfig, ExperimentManager, get_preset_config, load_model\n"
        "from gmmt.config.experiment import ExperimentConfig as seed_config\n"
        "from gmmt.training.experiment import ExperimentManager as seed_manager\n"
        "from gmmt.config.registry import ExperimentRegistry\n"
        "cfg = get_preset_config('quick_test')\n"
        "every = all(getattr(gmmt, n) is not None for n in gmmt.__all__)\n"
        "print(json.dumps({'names': names, 'checks': [light, ExperimentConfig is seed_config, "
        "ExperimentManager is seed_manager, isinstance(cfg, ExperimentConfig), "
        "callable(load_model), every, gmmt.ExperimentRegistry is ExperimentRegistry]}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", script], check=True,
                                    capture_output=True, text=True, timeout=120).stdout)
    assert out["names"] == sorted(
        ["ConfigError", "ExperimentConfig", "ExperimentManager", "ExperimentRegistry",
         "__version__", "get_preset_config", "get_preset_description",
         "list_experiment_presets", "load_model", "predict"])
    assert out["checks"] == [True] * 7
