"""Layered presets: JSON layers -> one plain dict -> one strict ExperimentConfig.

Layers, lowest first (docs/design.md):
  1. code defaults of the attrs classes;
  2. component presets ``<dir>/{model,training,data,validation}/*.json`` and data-parameter
     presets ``<dir>/data_params/<field>/*.json`` (names such as ``"few"`` become explicit dicts);
  3. the experiment preset ``<dir>/experiments/*.json`` (names components, may carry overrides);
  4. user preset folders (``GMMT_CONFIG_PATH``, ``--config-dir``) over the packaged folder;
  5. a user config file;
  6. the ``DEVICE`` environment variable, then command-line flags and ``--set`` overrides.

Every preset file is a JSON object mapping preset names to bodies; a body may hold
``"description"`` and ``"extends": "<other preset of the same kind>"``. Dropping a new file (or
entry) into a folder makes its presets available; nothing is registered in code.
"""

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import define

from gmmt.config.converter import load_json, structure, unstructure
from gmmt.config.data import DISTRIBUTION_FIELDS, DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError, close_matches, describe_value, type_shape
from gmmt.config.overrides import assignment_layer, deep_merge, nested

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "configs"
COMPONENTS = ("model", "training", "data", "validation")
EXPERIMENT_KEYS = ("description", "extends", *COMPONENTS, "overrides")
DEFAULT_EXPERIMENT = "quick_test"
META_KEYS = ("description", "extends")


@define
class _Entry:
    body: dict[str, Any]
    level: int
    file: Path


def preset_dirs(config_dirs: Sequence[str | os.PathLike] = (),
                environ: Mapping[str, str] | None = None) -> list[Path]:
    """Preset folders, lowest priority first: packaged, GMMT_CONFIG_PATH (first entry wins),
    then ``config_dirs`` (last wins)."""
    environ = os.environ if environ is None else environ
    env_dirs = [p for p in environ.get("GMMT_CONFIG_PATH", "").split(os.pathsep) if p]
    dirs = [PACKAGED_DIR] + [Path(p) for p in reversed(env_dirs)] + [Path(p) for p in config_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ConfigError([f"preset folder not found: {m}" for m in missing], "bad preset folder")
    return dirs


class PresetStore:
    """All presets found in a list of folders (later folders override earlier ones)."""

    def __init__(self, dirs: Sequence[Path] | None = None) -> None:
        self.dirs = list(dirs) if dirs is not None else preset_dirs()
        self._cache: dict[str, dict[str, list[_Entry]]] = {}

    def _entries(self, kind: str) -> dict[str, list[_Entry]]:
        if kind not in self._cache:
            found: dict[str, list[_Entry]] = {}
            for level, root in enumerate(self.dirs):
                seen_here: dict[str, Path] = {}
                for file in sorted((root / kind).glob("*.json")):
                    data = load_json(file)
                    if not isinstance(data, dict):
                        raise ConfigError([f"{file}: expected an object mapping preset names to "
                                           f"presets"], "bad preset file")
                    for name, body in data.items():
                        if not isinstance(body, dict):
                            raise ConfigError([f"{file}: preset {name!r} must be an object"],
                                              "bad preset file")
                        if name in seen_here:
                            raise ConfigError([f"{kind} preset {name!r} is defined in both "
                                               f"{seen_here[name]} and {file}"], "duplicate preset")
                        seen_here[name] = file
                        found.setdefault(name, []).append(_Entry(body, level, file))
            self._cache[kind] = found
        return self._cache[kind]

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries(kind))

    def _entry(self, kind: str, name: str, below: int | None = None) -> _Entry:
        entries = [e for e in self._entries(kind).get(name, []) if below is None or e.level < below]
        if not entries:
            known = self.names(kind)
            label = {"experiments": "experiment"}.get(kind, kind.replace("data_params/", ""))
            hint = close_matches(name, known)
            msg = f"unknown {label} preset {name!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            raise ConfigError([f"{msg}; known: {', '.join(known) or '(none)'}"], "unknown preset")
        return entries[-1]

    def resolve(self, kind: str, name: str) -> dict[str, Any]:
        """The preset body with ``extends`` applied; ``description``/``extends`` removed."""
        return self._resolve(kind, name, None, ())

    def _resolve(self, kind: str, name: str, below: int | None,
                 chain: tuple[str, ...]) -> dict[str, Any]:
        entry = self._entry(kind, name, below)
        key = f"{name}@{entry.level}"
        if key in chain:
            raise ConfigError([f"{kind} preset {name!r} extends itself: "
                               f"{' -> '.join((*chain, key))}"], "preset cycle")
        body = {k: v for k, v in entry.body.items() if k not in META_KEYS}
        if kind in COMPONENTS:
            # Data-parameter names ("few") become dicts before a child merges over its parent:
            # a partial dict over a name would otherwise be dropped (see deep_merge).
            body = self.resolve_data_params({kind: body})[kind]
        parent = entry.body.get("extends")
        if parent is None:
            return body
        if not isinstance(parent, str):
            raise ConfigError([f"{entry.file}: {name}.extends must be a preset name"],
                              "bad preset file")
        # A user preset may extend the packaged preset of the same name.
        parent_below = entry.level if parent == name else None
        return deep_merge(self._resolve(kind, parent, parent_below, (*chain, key)), body)

    def description(self, kind: str, name: str) -> str:
        return str(self._entry(kind, name).body.get("description", ""))

    def experiment(self, name: str) -> dict[str, Any]:
        """An experiment preset: component names plus overrides (``extends`` applied)."""
        body = self.resolve("experiments", name)
        unknown = sorted(set(body) - set(EXPERIMENT_KEYS))
        if unknown:
            file = self._entry("experiments", name).file
            raise ConfigError([f"{file}: experiment preset {name!r} has unknown keys {unknown}; "
                               f"accepted: {', '.join(EXPERIMENT_KEYS)}"], "bad preset file")
        for component in COMPONENTS:
            if not isinstance(body.get(component), str):
                file = self._entry("experiments", name).file
                raise ConfigError([f"{file}: experiment preset {name!r} must name a {component} "
                                   f"preset (a string)"], "bad preset file")
        return body

    def resolve_data_params(self, layer: dict[str, Any]) -> dict[str, Any]:
        """Replace data-parameter preset names (``"few"``) by their dicts.

        Names are looked up in ``data`` and in ``training.curriculum`` (its set sizes); an
        unknown name is reported at its path.
        """
        out = copy.deepcopy(layer)
        for path in (("data",), ("training", "curriculum")):
            section = out
            for key in path:
                section = section.get(key) if isinstance(section, dict) else None
            if not isinstance(section, dict):
                continue
            for field in DISTRIBUTION_FIELDS:
                if isinstance(section.get(field), str):
                    try:
                        section[field] = self.resolve(f"data_params/{field}", section[field])
                    except ConfigError as err:
                        where = ".".join((*path, field))
                        raise ConfigError([f"{p} @ $.{where}" for p in err.problems],
                                          err.title) from None
        return out


def section_problems(layer: Any, cls: type = ExperimentConfig, path: str = "$") -> list[str]:
    """Sections of one layer that should be objects and are not (``"metadata": 5``).

    Checked per layer because merging cannot: a later layer's object (every run's provenance
    record in ``metadata``, a ``--set model.x=...``) replaces the wrong value below it, which
    would then never reach strict structuring. Keys the class lacks are left to structuring.
    """
    if not isinstance(layer, dict):
        return []
    types = {f.name: f.type for f in attrs.fields(cls)}
    out = []
    for key, value in layer.items():
        tp = types.get(key)
        if tp is None or type_shape(tp)[0] != "class":
            continue
        sub = f"{path}.{key}"
        if isinstance(value, dict):
            out.extend(section_problems(value, tp, sub))
        elif not (tp is DistributionSpec and isinstance(value, str)):  # a preset name
            out.append(f"expected an object ({tp.__name__}), got {describe_value(value)} @ {sub}")
    return out


def _checked(layer: dict[str, Any], source: str = "") -> dict[str, Any]:
    """``layer`` itself, after :func:`section_problems` found nothing (else ConfigError)."""
    problems = section_problems(layer)
    if problems:
        raise ConfigError([f"{source}: {p}" if source else p for p in problems])
    return layer


@define
class Resolved:
    """A resolved config and how it was made (for printing, saving and diffs)."""

    config: ExperimentConfig
    preset: str | None
    components: dict[str, str]
    overrides: list[str]
    bare: dict[str, Any]  # the experiment preset alone, before files, env and flags


def resolve_config(
    preset: str | None = None,
    *,
    model: str | None = None,
    training: str | None = None,
    data: str | None = None,
    validation: str | None = None,
    config_file: str | os.PathLike | None = None,
    config_dirs: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    device: str | None = None,
    exp_name: str | None = None,
    seed: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Build an ExperimentConfig from all layers. Raises ConfigError on any problem.

    With neither ``preset`` nor ``config_file`` the ``quick_test`` experiment is the base;
    with only ``config_file`` the file is layered over code defaults (a saved config reproduces
    itself exactly).
    """
    environ = os.environ if environ is None else environ
    store = PresetStore(preset_dirs(config_dirs, environ))
    chosen = {"model": model, "training": training, "data": data, "validation": validation}
    layered = unstructure(ExperimentConfig())
    file_only = preset is None and config_file is not None and not any(chosen.values())
    preset_name = None if file_only else (preset or DEFAULT_EXPERIMENT)
    components: dict[str, str] = {}
    bare = layered
    if preset_name is not None:
        experiment = store.experiment(preset_name)
        components = {c: chosen[c] or experiment[c] for c in COMPONENTS}
        meta = {"metadata": {"exp_name": preset_name,
                             "description": store.description("experiments", preset_name)}}

        def build(names: dict[str, str]) -> dict[str, Any]:
            out = deep_merge(layered, meta)
            for component, name in names.items():
                body = store.resolve_data_params({component: store.resolve(component, name)})
                out = deep_merge(out, _checked(body, f"{component} preset {name!r}"))
            overrides = store.resolve_data_params(experiment.get("overrides", {}))
            return deep_merge(out, _checked(overrides, f"experiment preset {preset_name!r}"))

        bare = build({c: experiment[c] for c in COMPONENTS})
        layered = build(components)
    if config_file is not None:
        file_layer = load_json(Path(config_file))
        if not isinstance(file_layer, dict):
            raise ConfigError([f"{config_file}: expected a JSON object"], "bad config file")
        layered = deep_merge(layered, _checked(store.resolve_data_params(file_layer)))

    applied: list[str] = []
    flag_sets = []
    if environ.get("DEVICE"):
        flag_sets.append(f"device.device={environ['DEVICE']}")
    if device is not None:
        flag_sets.append(f"device.device={device}")
    if exp_name is not None:
        flag_sets.append(f"metadata.exp_name={exp_name}")
    for expr in flag_sets:  # plain strings: never JSON-parsed (an exp_name "1" stays a string)
        key, _, value = expr.partition("=")
        layered = deep_merge(layered, nested(key.split("."), value))
        applied.append(expr)
    if seed is not None:
        layered = deep_merge(layered, {"device": {"seed": seed}})
        applied.append(f"device.seed={seed}")
    for expr in overrides:
        layered = deep_merge(layered, _checked(store.resolve_data_params(assignment_layer(expr)),
                                               f"--set {expr}"))
        applied.append(expr)

    meta_record: dict[str, Any] = {"overrides": applied}
    if preset_name is not None:
        meta_record.update(preset=preset_name, component_presets=components)
    else:  # a file-only config keeps the provenance it was saved with, plus the new overrides
        meta = layered.get("metadata")
        earlier = meta.get("overrides", []) if isinstance(meta, dict) else []
        meta_record["overrides"] = (earlier if isinstance(earlier, list) else []) + applied
    layered = deep_merge(layered, {"metadata": meta_record})
    return Resolved(structure(layered, ExperimentConfig), preset_name, components, applied, bare)


# --- the original programmatic API -----------------------------------------------------------


def get_preset_config(preset_name: str = DEFAULT_EXPERIMENT, device: str | None = None,
                      exp_name: str | None = None, **overrides: Any) -> ExperimentConfig:
    """A complete ExperimentConfig from an experiment preset.

    ``device`` and ``exp_name`` override the preset (``device`` also beats the ``DEVICE``
    environment variable); extra keyword arguments are dotted overrides, e.g.
    ``get_preset_config("standard", **{"training.optimizer.lr": 2e-4})``.
    """
    sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return resolve_config(preset_name, device=device, exp_name=exp_name, overrides=sets).config


def list_experiment_presets() -> list[str]:
    """Names of every experiment preset (packaged and user folders)."""
    return PresetStore().names("experiments")


def list_component_presets(component: str) -> list[str]:
    """Names of the presets of one component: model, training, data or validation."""
    if component not in COMPONENTS:
        raise ConfigError([f"unknown component {component!r}; known: {', '.join(COMPONENTS)}"])
    return PresetStore().names(component)


def get_preset_description(preset_name: str) -> dict[str, Any]:
    """What an experiment preset is made of: description, component names, overrides."""
    store = PresetStore()
    body = store.experiment(preset_name)
    return {"name": preset_name, "description": store.description("experiments", preset_name),
            **{c: body[c] for c in COMPONENTS}, "overrides": body.get("overrides", {})}
