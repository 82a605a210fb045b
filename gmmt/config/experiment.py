"""The top-level ExperimentConfig and its small sections (metadata, paths, device, logging)."""

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from gmmt.config.data import DataConfig
from gmmt.config.fields import FieldProblem, config_class, non_negative, positive, setting
from gmmt.config.model import ModelConfig
from gmmt.config.training import TrainingConfig
from gmmt.config.validation import ValidationConfig

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _safe_name(_instance: Any, attribute: Any, value: str) -> None:
    if not _SAFE_NAME.match(value):
        raise FieldProblem(attribute.name, f"must start with a letter or digit and use only "
                           f"letters, digits, '_', '-', '.' (it names a folder); got {value!r}")


@config_class
class MetadataConfig:
    """Who and what this run is. The preset fields record how the config was made."""

    exp_name: str = setting("gmmt", "experiment name; the run folder is <exp_name>-<id>",
                            _safe_name)
    description: str = setting("", "free text")
    tags: list[str] = setting(doc="labels, also sent to trackers", factory=list)
    preset: str | None = setting(None, "experiment preset the config was built from")
    component_presets: dict[str, str] = setting(
        doc="component presets used (model, training, data, validation)", factory=dict)
    overrides: list[str] = setting(doc="command-line overrides applied, in order", factory=list)


@config_class
class PathsConfig:
    """Where runs are written."""

    base_dir: str = setting("runs", "runs go to <base_dir>/<exp_name>-<id>/")


@config_class
class DeviceConfig:
    """Hardware, precision and seed."""

    device: Literal["auto", "cpu", "cuda", "mps", "tpu"] = setting(
        "auto", "auto defers to the launcher (accelerate) and picks a GPU when there is one")
    gpu_id: int | None = setting(None, "GPU index for a single-process run (null: launcher's)",
                                 non_negative)
    mixed_precision: Literal["no", "bf16", "fp16"] | bool = setting(
        "no", "autocast precision; fp16 (with loss scaling) needs a GPU; true picks bf16 where "
        "the device has it, else fp16 on CUDA (saved resolved); false is 'no'")
    seed: int = setting(42, "seed of everything: data streams, initialisation", non_negative)
    deterministic: bool = setting(False, "ask torch for deterministic kernels (slower on GPU)")


Precision = Literal["no", "bf16", "fp16"]


def resolve_mixed_precision(device: DeviceConfig) -> Precision:
    """The precision string ``device.mixed_precision`` stands for on this machine.

    ``false`` is ``"no"``. ``true`` ("mixed precision, whichever this hardware does well") is
    bf16 on a GPU with bf16 and on a TPU, fp16 (with loss scaling) on an older CUDA GPU, bf16 on
    a CPU with native bf16 instructions, and ``"no"`` elsewhere: emulated bf16 on a CPU is
    slower than float32, and MPS autocast support depends on the macOS version. ``auto`` is
    judged as the launcher will place it (a GPU when one is visible). Strings pass unchanged.
    """
    value = device.mixed_precision
    if isinstance(value, str):
        return value  # type: ignore[return-value]
    if not value:
        return "no"
    import torch

    where = device.device
    if where == "auto":
        where = ("cuda" if torch.cuda.is_available()
                 else "mps" if torch.backends.mps.is_available() else "cpu")
    if where == "tpu":
        return "bf16"
    if where == "cuda":
        if not torch.cuda.is_available():
            return "no"  # the run stops anyway: no GPU for device 'cuda'
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if where == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return "bf16" if native else "no"
    return "no"


@config_class
class WandbConfig:
    """Weights & Biases tracking (offline unless asked; files live in the run folder)."""

    enabled: bool = setting(True, "log to wandb (main process only)")
    mode: Literal["offline", "online", "disabled"] = setting(
        "offline", "offline writes local files to sync later; online needs an account")
    project: str = setting("gmmt", "wandb project")
    entity: str | None = setting(None, "wandb entity (team or user)")
    log_images: bool = setting(True, "send plots as images")


@config_class
class LoggingConfig:
    """Console, file and tracker logging."""

    console_level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "console log level")
    file_level: Literal["debug", "info", "warning", "error"] = setting(
        "debug", "train.log level")
    log_every_n_steps: int = setting(10, "log training scalars every n optimizer steps",
                                     positive)
    progress_bar: bool = setting(True, "show a progress bar (main process, interactive only)")
    tensorboard: bool = setting(False, "also write tensorboard event files")
    wandb: WandbConfig = setting(doc="wandb", factory=WandbConfig)


@config_class
class ExperimentConfig:
    """Everything one experiment needs. Build it from presets (``get_preset_config``) or a dict.

    ``to_dict``/``from_dict`` (aliases ``model_dump``/``model_validate``) convert strictly to and
    from plain JSON-ready dicts; ``save``/``load`` do the same with a file.
    """

    metadata: MetadataConfig = setting(doc="identification", factory=MetadataConfig)
    paths: PathsConfig = setting(doc="output folders", factory=PathsConfig)
    device: DeviceConfig = setting(doc="hardware and seed", factory=DeviceConfig)
    model: ModelConfig = setting(doc="the network", factory=ModelConfig)
    training: TrainingConfig = setting(doc="the training loop", factory=TrainingConfig)
    data: DataConfig = setting(doc="the data prior", factory=DataConfig)
    validation: ValidationConfig = setting(doc="evaluation", factory=ValidationConfig)
    logging: LoggingConfig = setting(doc="logging and trackers", factory=LoggingConfig)

    def _problems(self) -> list[tuple[str, str]]:
        out = []
        if self.device.mixed_precision == "fp16" and self.device.device in ("cpu", "mps", "tpu"):
            out.append(("device.mixed_precision", f"fp16 needs a CUDA GPU (device is "
                        f"{self.device.device!r}); use 'bf16' or 'no'"))
        if self.device.gpu_id is not None and self.device.device not in ("cuda", "auto"):
            out.append(("device.gpu_id", f"only used with device 'cuda' (device is "
                        f"{self.device.device!r})"))
        return out

    # --- conversion -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict of every setting."""
        from gmmt.config.converter import unstructure

        return unstructure(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        """Build strictly from a dict; raises ConfigError listing every problem with its path."""
        from gmmt.config.converter import structure

        return structure(data, cls)

    model_dump = to_dict
    model_validate = from_dict

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically: a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExperimentConfig":
        """Read a config saved with :meth:`save` (or any JSON of the same shape)."""
        from gmmt.config.converter import load_json

        return cls.from_dict(load_json(Path(path)))

    def validate(self) -> None:
        """Re-check every field and cross-field rule (after in-place edits); raise ConfigError."""
        from gmmt.config.converter import check

        check(self)
