"""Config classes: defaults, strict assignment, cross-field rules, the seed's snippets."""

import json
from typing import Any, Literal

import pytest

from gmmt.config.converter import CONVERTER
from gmmt.config.data import DISTRIBUTION_FIELDS, DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import (
    ConfigError,
    FieldProblem,
    coerce,
    describe_type,
    type_problem,
    type_shape,
)
from gmmt.config.presets import PACKAGED_DIR, get_preset_config
from gmmt.config.schema import _type_schema


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    return info.value.problems


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = ExperimentConfig()
    cfg.validate()
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("training.num_epochs", "x", "expected int, got str 'x'"),
    ("training.num_epochs", 3.7, "expected int, got float 3.7"),
    ("training.num_epochs", True, "expected int, got bool True"),
    ("training.num_epochs", 0, "must be > 0"),
    ("training.optimizer.lr", "5", "expected float, got str '5'"),
    ("model.transformer.activation", "gelux", "did you mean 'gelu'?"),
    ("metadata.description", None, "expected str, got NoneType None"),
    ("device.device", "cpu ", "expected one of"),
])
def test_assignment_is_checked(path: str, value: object, expected: str) -> None:
    cfg = ExperimentConfig()
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    before = getattr(obj, leaf)
    with pytest.raises(FieldProblem, match=leaf) as info:
        setattr(obj, leaf, value)
    assert expected in str(info.value)
    assert getattr(obj, leaf) == before  # a rejected assignment changes nothing


def test_misspelt_attribute_raises() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.training.learning_rat = 0.1  # type: ignore[attr-defined]


def test_int_widens_to_float_and_lists_to_tuples() -> None:
    cfg = ExperimentConfig()
    cfg.training.optimizer.lr = 1
    assert isinstance(cfg.training.optimizer.lr, float)
    cfg.training.optimizer.betas = [0.8, 0.9]  # type: ignore[assignment]
    assert cfg.training.optimizer.betas == (0.8, 0.9)


def test_seed_snippets_work() -> None:
    """The seed document's override example, verbatim apart from the package prefix."""
    experiment_config = get_preset_config("standard")
    experiment_config.training.num_epochs = 75
    experiment_config.training.learning_rate = 0.0002
    experiment_config.model.transformer.dropout = 0.2
    experiment_config.data.dim = 3
    assert experiment_config.training.optimizer.lr == 0.0002
    assert experiment_config.training.total_steps == 75 * experiment_config.training.steps_per_epoch
    dumped = json.loads(json.dumps(experiment_config.model_dump()))
    assert ExperimentConfig.model_validate(dumped) == experiment_config


def test_every_problem_reported_at_once_with_paths() -> None:
    data = ExperimentConfig().to_dict()
    data["training"]["optimizer"]["lr"] = "abc"
    data["training"]["learning_rat"] = 1
    data["model"]["transformer"]["num_heads"] = 3
    data["data"]["snr_db_params"] = {"type": "uniform", "min": 9, "max": 3}
    data["validation"]["baselines"] = ["oracle", "emm"]
    problems = problems_of(data)
    joined = "\n".join(problems)
    assert "expected float, got str 'abc' @ $.training.optimizer.lr" in joined
    assert "extra fields found (learning_rat" in joined and "@ $.training" in joined
    assert "did you mean 'optimizer.lr'?" in joined
    assert "not divisible by num_heads 3 @ $.model.transformer.num_heads" in joined
    assert "must be <= max" in joined and "$.data.snr_db_params.min" in joined
    assert "did you mean 'em'?" in joined and "$.validation.baselines[1]" in joined
    assert len(problems) == 5


@pytest.mark.parametrize(("section", "bad", "fix"), [
    ("cluster_params", {"type": "uniform", "min": 1, "max": 4}, "set min >= 2"),
    ("cluster_params", {"type": "poisson", "rate": 3}, "use a type with max"),
    ("sample_count_distribution", {"type": "fixed", "value": 0}, "set value >= 1"),
    ("sample_count_distribution", {"type": "normal", "mean": 9, "std": 1}, "with min"),
    ("cluster_params", {"type": "uniform", "min": 2.3, "max": 2.7}, "no integer between"),
])
def test_data_rules(section: str, bad: dict, fix: str) -> None:
    data = ExperimentConfig().to_dict()
    data["data"][section] = bad
    mine = [p for p in problems_of(data) if f"$.data.{section}" in p]
    assert mine and any(fix in p for p in mine), mine


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "uniform", "min": 1}, "required for type 'uniform'"),
    ({"type": "uniform", "min": 1, "max": 2, "mean": 3}, "not used by type 'uniform'"),
    ({"type": "normal", "mean": 0, "std": -1}, "must be > 0"),
    ({"type": "choice", "values": [1, 2], "probs": [0.5, 0.6]}, "must sum to 1"),
    ({"type": "choice", "values": [1, 2], "probs": [1.0]}, "has 1 entries but values has 2"),
    ({"type": "choice", "values": []}, "must not be empty"),
    ({"type": "truncated_poisson", "rate": 2, "min": 5, "max": 1}, "must be <= max"),
    ({"type": "gamma", "value": 1}, "expected one of 'fixed'"),
])
def test_distribution_spec_rules(spec: dict, message: str) -> None:
    data = ExperimentConfig().to_dict()
    data["data"]["snr_db_params"] = spec
    assert any(message in p for p in problems_of(data)), problems_of(data)


def test_every_distribution_type_has_a_valid_form() -> None:
    from gmmt.config.converter import structure, unstructure

    for spec in [{"type": "fixed", "value": 3}, {"type": "poisson", "rate": 2},
                 {"type": "truncated_poisson", "rate": 2, "min": 1, "max": 9},
                 {"type": "uniform", "min": 1, "max": 2}, {"type": "normal", "mean": 0, "std": 1},
                 {"type": "truncated_normal", "mean": 0, "std": 1, "min": -1, "max": 1},
                 {"type": "truncated_lognormal", "mean": 0, "std": 1, "min": 1, "max": 5},
                 {"type": "choice", "values": [1, 2], "probs": [0.25, 0.75]},
                 {"type": "choice", "values": [1, 2]}]:
        built = structure(spec, DistributionSpec)
        saved = unstructure(built)
        assert saved == {k: (float(v) if isinstance(v, int) else v) for k, v in spec.items()
                         if k != "values" and k != "probs"} | {
            k: [float(x) for x in spec[k]] for k in ("values", "probs") if k in spec}
        assert structure(json.loads(json.dumps(saved)), DistributionSpec) == built


@pytest.mark.parametrize(("edit", "path"), [
    ({"device": {"device": "cpu", "mixed_precision": "fp16"}}, "$.device.mixed_precision"),
    ({"model": {"transformer": {"repetition": {"mode": "grouped", "group_sizes": [2, 1],
                                               "group_factors": [1, 1]}}}},
     "$.model.transformer.repetition.group_sizes"),
    ({"model": {"transformer": {"repetition": {"mode": "grouped", "group_sizes": [2, 2],
                                               "group_factors": [1]}}}},
     "$.model.transformer.repetition.group_factors"),
    ({"validation": {"metrics": ["gap_closed"], "baselines": ["oracle"]}}, "$.validation.metrics"),
    ({"training": {"num_epochs": 1, "steps_per_epoch": 10,
                   "scheduler": {"warmup_steps": 11}}}, "$.training.scheduler.warmup_steps"),
    ({"metadata": {"exp_name": "../escape"}}, "$.metadata.exp_name"),
    ({"model": {"prediction": {"set_normalization": False, "principal_axes": True}}},
     "$.model.prediction.principal_axes"),
    ({"model": {"prediction": {"output_smoothing": -0.1}}}, "$.model.prediction.output_smoothing"),
    ({"model": {"prediction": {"output_smoothing": 1e-20}}}, "$.model.prediction.output_smoothing"),
    ({"training": {"loss": {"type": "energy", "target": "labelled_posterior_mean"}}},
     "$.training.loss.target"),
    ({"training": {"num_epochs": 1, "steps_per_epoch": 10, "curriculum": {"steps": 11}}},
     "$.training.curriculum.steps"),
    ({"training": {"curriculum": {"steps": 5, "sample_count_distribution": {
        "type": "poisson", "rate": 50}}}}, "$.training.curriculum.sample_count_distribution"),
])
def test_cross_field_rules(edit: dict, path: str) -> None:
    from gmmt.config.overrides import deep_merge

    data = deep_merge(ExperimentConfig().to_dict(), edit)
    assert any(p.endswith(path) for p in problems_of(data)), problems_of(data)


def test_validate_catches_in_place_edits() -> None:
    cfg = ExperimentConfig()
    cfg.validation.baselines.append("nonsense")  # lists mutate without assignment
    cfg.model.transformer.num_heads = 3  # valid alone, breaks hidden_dim % num_heads
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    joined = "\n".join(info.value.problems)
    assert "$.validation.baselines" in joined
    assert "$.model.transformer.num_heads" in joined


def test_save_and_load_are_lossless(tmp_path) -> None:
    cfg = get_preset_config("high_performance")
    path = cfg.save(tmp_path / "sub" / "config.json")
    assert ExperimentConfig.load(path) == cfg
    assert not list(path.parent.glob(".*tmp*"))  # no temp file left behind


def test_block_schedule_and_effective_depth() -> None:
    cfg = ExperimentConfig()
    t = cfg.model.transformer
    t.num_layers = 3
    t.repetition.mode = "cycle"
    t.repetition.factor = 2
    assert t.block_schedule() == [0, 1, 2, 0, 1, 2]
    t.repetition.mode = "layerwise"
    assert t.block_schedule() == [0, 0, 1, 1, 2, 2]
    t.repetition.mode = "grouped"
    t.repetition.factor = 1
    t.repetition.group_sizes = [1, 2]
    t.repetition.group_factors = [3, 1]
    assert t.block_schedule() == [0, 0, 0, 1, 2]
    assert t.effective_depth == 5


NUMBER, TEXT = {"type": "number"}, {"type": "string"}
SHAPES = [
    (type(None), "null", "null", {"type": "null"}),
    (bool, "bool", "bool", {"type": "boolean"}),
    (int, "int", "int", {"type": "integer"}),
    (float, "float", "float", NUMBER),
    (str, "str", "str", TEXT),
    (Literal["a", 1], "literal", "one of 'a', 1", {"enum": ["a", 1]}),
    (float | None, "union", "float or null", {"anyOf": [NUMBER, {"type": "null"}]}),
    (list[float], "list", "list of float", {"type": "array", "items": NUMBER}),
    (tuple[float, str], "tuple", "list of float, str",
     {"type": "array", "prefixItems": [NUMBER, TEXT], "minItems": 2, "maxItems": 2}),
    (dict[str, float], "dict", "object with float values",
     {"type": "object", "additionalProperties": NUMBER}),
    (DistributionSpec, "class", "object (DistributionSpec)",
     {"$ref": "#/$defs/DistributionSpec"}),
]
JSON_VALUES = [None, True, 0, 2, 1.5, "a", "x", [], [1, 2], [1.5, "a"], [1, "a", 2],
               {"k": 1}, {"k": "x"}, {"type": "fixed", "value": 3}]


@pytest.mark.parametrize(("tp", "kind", "words", "schema"), SHAPES)
def test_one_type_shape_serves_wording_and_schema(tp: Any, kind: str, words: str,
                                                  schema: dict) -> None:
    assert type_shape(tp)[0] == kind
    assert describe_type(tp) == words
    assert _type_schema(tp, {}) == schema


@pytest.mark.parametrize("tp", [tp for tp, kind, *_ in SHAPES if kind != "class"])
@pytest.mark.parametrize("value", JSON_VALUES)
def test_structuring_and_assignment_check_agree(tp: Any, value: Any) -> None:
    """The converter accepts exactly what the on-assignment check accepts, widened alike."""
    try:
        built = CONVERTER.structure(value, tp)
    except Exception:
        assert type_problem(value, tp) is not None
        return
    assert type_problem(value, tp) is None
    widened = coerce(value, tp)
    assert built == widened
    assert repr(built) == repr(widened)  # same types too: 2.0 not 2, a tuple not a list


def test_distribution_fields_are_the_data_param_preset_folders() -> None:
    assert sorted(DISTRIBUTION_FIELDS) == sorted(
        p.name for p in (PACKAGED_DIR / "data_params").iterdir() if p.is_dir())

