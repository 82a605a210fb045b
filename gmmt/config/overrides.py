"""Plain-dict operations on config layers: deep merge, ``--set a.b.c=VALUE``, diffs."""

import copy
import json
from typing import Any

from gmmt.config.data import DISTRIBUTION_FIELDS
from gmmt.config.fields import ConfigError


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``overlay`` over ``base``; nested dicts merge, everything else replaces.

    A later object replaces whatever non-object lies below it, so a section of the wrong type
    (``"metadata": 5``) must be caught in its own layer (``presets.section_problems``) before
    merging, or the provenance record every run adds to ``metadata`` would hide it.
    """
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        old = out.get(key)
        # A distribution given a new type is replaced whole: the old type's parameters merged
        # into it would only be reported as "not used by type".
        typed_replace = key in DISTRIBUTION_FIELDS and isinstance(value, dict) and "type" in value
        if isinstance(old, dict) and isinstance(value, dict) and not typed_replace:
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """``--set`` values are JSON (``3``, ``0.1``, ``true``, ``null``, ``[1,2]``); else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(expr: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=VALUE`` into (["a", "b", "c"], parsed VALUE)."""
    key, sep, raw = expr.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ConfigError([f"--set expects KEY.PATH=VALUE (e.g. training.optimizer.lr=3e-4), "
                           f"got {expr!r}"], "bad override")
    return [k.strip() for k in keys], parse_value(raw.strip())


def nested(keys: list[str], value: Any) -> dict[str, Any]:
    """``(["a", "b"], 1)`` -> ``{"a": {"b": 1}}``."""
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def assignment_layer(expr: str) -> dict[str, Any]:
    """One ``--set`` expression as a layer to merge."""
    keys, value = parse_assignment(expr)
    return nested(keys, value)


def diff(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf-level differences between two plain configs: (dotted path, old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out.extend(diff(old.get(key, "<absent>"), new.get(key, "<absent>"), sub))
        return out
    return [] if old == new else [(path, old, new)]


def format_diff(changes: list[tuple[str, Any, Any]]) -> str:
    if not changes:
        return "  (no changes)"
    return "\n".join(f"  {p}: {json.dumps(a)} -> {json.dumps(b)}" for p, a, b in changes)
