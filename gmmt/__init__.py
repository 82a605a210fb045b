"""gmmt: transformers that denoise sets drawn from unknown Gaussian mixtures.

The public API::

    from gmmt import ExperimentConfig, ExperimentManager, get_preset_config, load_model, predict

Names are imported on first use, so ``import gmmt`` (and the configuration API) does not pay
for torch and Accelerate until a model or a trainer is needed.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "gmmt.config.fields",
    "ExperimentConfig": "gmmt.config.experiment",
    "ExperimentManager": "gmmt.training.experiment",
    "ExperimentRegistry": "gmmt.config.registry",
    "get_preset_config": "gmmt.config.presets",
    "get_preset_description": "gmmt.config.presets",
    "list_experiment_presets": "gmmt.config.presets",
    "load_model": "gmmt.saved_model",
    # the command-line module, itself callable as gmmt.inference.predict (see gmmt/predict.py)
    "predict": "gmmt.predict",
}

__all__ = sorted(["__version__", *_EXPORTS])


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gmmt' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    # a name exported as a whole module (gmmt.predict) is that module, not an attribute of it
    value = module if module.__name__ == f"gmmt.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return list(__all__)
