"""Layered presets: every packaged preset, layering order, user folders, inheritance, errors."""

import inspect
import json
from pathlib import Path

import pytest

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.presets import (
    COMPONENTS,
    PresetStore,
    get_preset_config,
    get_preset_description,
    list_experiment_presets,
    resolve_config,
)
from gmmt.config.registry import ExperimentRegistry

STORE = PresetStore()


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_experiment_presets_listed_with_descriptions() -> None:
    assert {"quick_test", "standard", "high_performance"} <= set(list_experiment_presets())
    desc = get_preset_description("standard")
    assert desc["model"] == "medium" and desc["validation"] == "standard"
    assert desc["description"]


@pytest.mark.parametrize("name", STORE.names("experiments"))
def test_every_experiment_preset_structures_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = get_preset_config(name)
    cfg.validate()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert ExperimentConfig.load(cfg.save(tmp_path / "c.json")) == cfg
    assert cfg.metadata.preset == name


@pytest.mark.parametrize(("component", "name"),
                         [(c, n) for c in COMPONENTS for n in STORE.names(c)])
def test_every_component_preset_structures_and_round_trips(component: str, name: str) -> None:
    cfg = resolve_config("quick_test", **{component: name}).config
    cfg.validate()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.metadata.component_presets[component] == name
    assert STORE.description(component, name)  # every preset says what it is for


def test_preset_sizes_match_the_design() -> None:
    quick, standard, high = (get_preset_config(n) for n in
                             ("quick_test", "standard", "high_performance"))
    sizes = [(c.model.transformer.hidden_dim, c.model.transformer.num_layers)
             for c in (quick, standard, high)]
    assert sizes == [(32, 4), (128, 16), (256, 48)]
    assert (quick.data.cluster_params.min, quick.data.cluster_params.max) == (2, 4)
    assert (standard.data.snr_db_params.min, standard.data.snr_db_params.max) == (7, 12)
    assert (high.data.sample_count_distribution.min, high.data.sample_count_distribution.max) \
        == (1500, 5000)
    assert high.device.mixed_precision == "bf16" and high.training.ema.enabled
    assert high.validation.baselines == ["identity", "oracle", "bayes", "em_tied", "em",
                                         "em_bic", "kmeans"]
    # quick_test's cheap yardsticks: its result can be judged (single-start EM, the oracle)
    assert quick.validation.baselines == ["identity", "oracle", "em"]
    assert quick.validation.em.n_init == 1


def test_data_param_names_become_explicit_dicts() -> None:
    cfg = get_preset_config("quick_test")
    saved = cfg.to_dict()["data"]
    assert saved["cluster_params"] == {"type": "uniform", "min": 2.0, "max": 4.0}
    override = resolve_config("quick_test", overrides=["data.snr_db_params=fixed_10"]).config
    assert override.data.snr_db_params.type == "fixed" and override.data.snr_db_params.value == 10
    # A typed replacement is whole, a partial one merges.
    merged = resolve_config("quick_test", overrides=["data.snr_db_params.min=13"]).config
    assert (merged.data.snr_db_params.min, merged.data.snr_db_params.max) == (13, 17)
    with pytest.raises(ConfigError, match=r"unknown snr_db_params preset 'esay'.*did you mean"):
        resolve_config("quick_test", overrides=["data.snr_db_params=esay"])
    # The curriculum's set sizes take the same names and the same whole replacement.
    named = resolve_config("quick_test", overrides=[
        "training.curriculum.sample_count_distribution=fixed_100"]).config
    assert named.training.curriculum.sample_count_distribution.value == 100
    assert named.to_dict()["training"]["curriculum"]["sample_count_distribution"] == {
        "type": "fixed", "value": 100.0}
    with pytest.raises(ConfigError, match=r"'tiny'.*@ \$\.training\.curriculum\."
                       r"sample_count_distribution"):
        resolve_config("quick_test",
                       overrides=["training.curriculum.sample_count_distribution=tiny"])


def test_layer_order() -> None:
    base = resolve_config("standard").config
    assert base.training.optimizer.lr == 0.0005  # training preset beats code default
    res = resolve_config("standard", model="small", device="cpu", exp_name="mine", seed=7,
                         overrides=["training.optimizer.lr=2e-4", "device.device=auto"],
                         environ={"DEVICE": "cuda"})
    cfg = res.config
    assert cfg.model.transformer.hidden_dim == 64  # --model-preset replaces the experiment's
    assert cfg.training.optimizer.lr == 2e-4
    assert cfg.device.device == "auto"  # --set beats --device beats DEVICE
    assert (cfg.metadata.exp_name, cfg.device.seed) == ("mine", 7)
    assert cfg.metadata.overrides == ["device.device=cuda", "device.device=cpu",
                                      "metadata.exp_name=mine", "device.seed=7",
                                      "training.optimizer.lr=2e-4", "device.device=auto"]
    assert resolve_config("standard", environ={"DEVICE": "cpu"}).config.device.device == "cpu"


def test_device_env_var_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE", "cpu")
    assert get_preset_config("standard").device.device == "cpu"
    assert get_preset_config("standard", device="cuda").device.device == "cuda"
    monkeypatch.setenv("DEVICE", "gpu")
    with pytest.raises(ConfigError, match=r"got 'gpu'.*@ \$\.device\.device"):
        get_preset_config("standard")


def test_registry_mix_and_match() -> None:
    cfg = ExperimentRegistry.get_experiment_config(
        model_name="medium", training_preset="standard", data_preset="complex",
        validation_preset="comprehensive", device="cuda", exp_name="my_experiment")
    assert cfg.model.transformer.hidden_dim == 128
    assert cfg.data.cluster_params.max == 15
    assert "em" in cfg.validation.baselines
    assert (cfg.device.device, cfg.metadata.exp_name) == ("cuda", "my_experiment")
    assert cfg.metadata.component_presets == {"model": "medium", "training": "standard",
                                              "data": "complex", "validation": "comprehensive"}


def test_registry_keeps_the_seed_signature() -> None:
    params = list(inspect.signature(ExperimentRegistry.get_experiment_config).parameters)
    assert params[:6] == ["model_name", "training_preset", "data_preset", "validation_preset",
                          "device", "exp_name"]
    cfg = ExperimentRegistry.get_experiment_config("medium", None, "complex", None, "cpu", "pos")
    assert cfg.metadata.component_presets["model"] == "medium"
    assert cfg.metadata.component_presets["data"] == "complex"
    assert (cfg.device.device, cfg.metadata.exp_name) == ("cpu", "pos")


def test_seed_preset_api() -> None:
    experiment_config = get_preset_config(preset_name="standard", device="cuda",
                                          exp_name="my_experiment")
    assert experiment_config.metadata.exp_name == "my_experiment"
    presets = get_preset_config("standard")
    assert presets.metadata.preset == "standard"


def test_new_experiment_preset_file_is_picked_up(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "experiments" / "experiment_simple.json", {
        "custom_experiment": {"description": "mine", "model": "medium", "training": "optimized",
                              "data": "standard", "validation": "comprehensive"}})
    monkeypatch.setenv("GMMT_CONFIG_PATH", str(tmp_path))
    assert "custom_experiment" in list_experiment_presets()
    cfg = get_preset_config("custom_experiment")
    assert cfg.training.ema.enabled and cfg.model.transformer.hidden_dim == 128
    assert ExperimentRegistry.list_experiments() == list_experiment_presets()


def test_user_folder_overrides_and_extends_packaged(tmp_path: Path) -> None:
    write(tmp_path / "model" / "mine.json", {
        "medium": {"description": "wider medium", "extends": "medium",
                   "transformer": {"hidden_dim": 192}},
        "medium_deep": {"description": "deeper", "extends": "medium",
                        "transformer": {"num_layers": 24}}})
    cfg = resolve_config("standard", config_dirs=[tmp_path]).config
    assert (cfg.model.transformer.hidden_dim, cfg.model.transformer.num_layers) == (192, 16)
    deep = resolve_config("standard", model="medium_deep", config_dirs=[tmp_path]).config
    assert (deep.model.transformer.hidden_dim, deep.model.transformer.num_layers) == (192, 24)
    # The packaged preset is unchanged for everyone else.
    assert get_preset_config("standard").model.transformer.hidden_dim == 128


def test_config_dir_beats_env_path(tmp_path: Path) -> None:
    env_dir, cli_dir = tmp_path / "env", tmp_path / "cli"
    for folder, lr in ((env_dir, 0.1), (cli_dir, 0.2)):
        write(folder / "training" / "t.json", {"quick": {"description": "x", "extends": "quick",
                                                        "optimizer": {"lr": lr}}})
    cfg = resolve_config("quick_test", config_dirs=[cli_dir],
                         environ={"GMMT_CONFIG_PATH": str(env_dir)}).config
    assert cfg.training.optimizer.lr == 0.2


def test_config_file_layer(tmp_path: Path) -> None:
    saved = get_preset_config("standard", exp_name="saved")
    saved.training.num_epochs = 3
    path = saved.save(tmp_path / "config.json")
    # Alone, a saved config reproduces itself.
    assert resolve_config(config_file=path).config == saved
    # Partial files layer over the preset; flags still win over the file.
    partial = write(tmp_path / "run.json", {"training": {"batch_size": 8}})
    cfg = resolve_config("quick_test", config_file=partial, overrides=["training.batch_size=4"])
    assert cfg.config.training.batch_size == 4
    assert resolve_config("quick_test", config_file=partial).config.training.batch_size == 8


@pytest.mark.parametrize(("files", "message"), [
    ({"experiments/a.json": {"x": {"model": "tiny", "training": "quick", "data": "simple",
                                   "validation": "minimal", "modle": "y"}}}, "unknown keys"),
    ({"experiments/a.json": {"x": {"model": "tiny"}}}, "must name a training preset"),
    ({"experiments/a.json": {"x": {"model": "tinyy", "training": "quick", "data": "simple",
                                   "validation": "minimal"}}}, "did you mean 'tiny'"),
    ({"model/a.json": {"x": {"extends": "y"}, "y": {"extends": "x"}},
      "experiments/a.json": {"x": {"model": "x", "training": "quick", "data": "simple",
                                   "validation": "minimal"}}}, "extends itself"),
    ({"model/a.json": {"dup": {}}, "model/b.json": {"dup": {}},
      "experiments/a.json": {"x": {"model": "dup", "training": "quick", "data": "simple",
                                   "validation": "minimal"}}}, "defined in both"),
    ({"experiments/a.json": ["not", "an", "object"]}, "expected an object"),
])
def test_bad_preset_files(tmp_path: Path, files: dict, message: str) -> None:
    for rel, body in files.items():
        write(tmp_path / rel, body)
    with pytest.raises(ConfigError, match=message):
        resolve_config("x", config_dirs=[tmp_path])


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "experiments" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{\n  "x": {"model": "tiny"\n  "training": "quick"}\n}\n')
    with pytest.raises(ConfigError) as info:
        resolve_config("quick_test", config_dirs=[tmp_path])
    assert f"{bad}:3:3: Expecting ',' delimiter" in info.value.problems[0]


def test_missing_preset_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preset folder not found"):
        resolve_config("quick_test", config_dirs=[tmp_path / "nope"])
