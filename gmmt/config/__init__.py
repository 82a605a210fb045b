"""Configuration: attrs classes, the strict converter, layered presets."""

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.presets import (
    get_preset_config,
    get_preset_description,
    list_experiment_presets,
    resolve_config,
)
from gmmt.config.registry import ExperimentRegistry

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ExperimentRegistry",
    "get_preset_config",
    "get_preset_description",
    "list_experiment_presets",
    "resolve_config",
]
