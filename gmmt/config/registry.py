"""ExperimentRegistry: mix and match component presets by name (the original API)."""

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.presets import (
    COMPONENTS,
    DEFAULT_EXPERIMENT,
    PresetStore,
    get_preset_description,
    list_component_presets,
    list_experiment_presets,
    resolve_config,
)


class ExperimentRegistry:
    """Named building blocks of experiments. Every method reads the preset folders afresh, so
    a JSON file added at run time is picked up."""

    @staticmethod
    def get_experiment_config(
        model_name: str | None = None,
        training_preset: str | None = None,
        data_preset: str | None = None,
        validation_preset: str | None = None,
        device: str | None = None,
        exp_name: str | None = None,
        experiment_preset: str = DEFAULT_EXPERIMENT,
    ) -> ExperimentConfig:
        """An ExperimentConfig from component presets; unnamed components come from
        ``experiment_preset``."""
        names = (model_name, training_preset, data_preset, validation_preset)
        return resolve_config(experiment_preset, device=device, exp_name=exp_name,
                              **dict(zip(COMPONENTS, names, strict=True))).config

    list_experiments = staticmethod(list_experiment_presets)
    list_components = staticmethod(list_component_presets)
    describe_experiment = staticmethod(get_preset_description)

    @staticmethod
    def describe_component(component: str, name: str) -> str:
        """The one-line description of a component preset."""
        return PresetStore().description(component, name)
