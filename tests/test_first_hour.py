"""What a new user meets in the first hour: precision shorthands, the console, quick_test's
yardsticks, and the refusal of GPU-sized runs on a CPU."""

import json
from pathlib import Path

import helpers
import pytest

from gmmt.config.experiment import ExperimentConfig, resolve_mixed_precision
from gmmt.config.presets import resolve_config
from gmmt.config.schema import json_schema
from gmmt.training.experiment import ExperimentManager


def only_run(base: Path) -> Path:
    (run,) = [p for p in base.iterdir() if p.is_dir()]
    return run


# --- device.mixed_precision: true / false ------------------------------------------------------


def test_boolean_mixed_precision_is_accepted_and_documented(tmp_path: Path) -> None:
    file = tmp_path / "seed.json"
    file.write_text(json.dumps({"device": {"device": "cpu", "mixed_precision": True}}))
    config = resolve_config(config_file=file).config
    assert config.device.mixed_precision is True
    assert resolve_mixed_precision(config.device) in ("bf16", "no")  # CPU: never fp16
    off = resolve_config(overrides=["device.mixed_precision=false"]).config
    assert resolve_mixed_precision(off.device) == "no"
    prop = json_schema()["$defs"]["DeviceConfig"]["properties"]["mixed_precision"]
    assert {"type": "boolean"} in prop["anyOf"] and "true" in prop["description"]


@pytest.mark.parametrize("value", ["1", '"yes"', "null"])
def test_other_mixed_precision_values_still_fail(value: str) -> None:
    with pytest.raises(Exception, match=r"@ \$\.device\.mixed_precision"):
        resolve_config(overrides=[f"device.mixed_precision={value}"])


def test_resolved_precision_is_what_the_run_saves(tmp_path: Path) -> None:
    config = helpers.small_config(tmp_path, "device.mixed_precision=false")
    ExperimentManager(config).run()
    saved = json.loads((only_run(tmp_path) / "config.json").read_text())
    assert saved["device"]["mixed_precision"] == "no"
    assert ExperimentConfig.load(only_run(tmp_path) / "config.json").device.mixed_precision == "no"
