"""JSON Schema (draft 2020-12) of ExperimentConfig, for editors and validators."""

from typing import Any

import attrs

from gmmt.config.converter import unstructure
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import type_shape


def _bounds(validator: Any) -> dict[str, Any]:
    """Numeric bounds declared by a field's range validators (see fields._bound)."""
    out: dict[str, Any] = {}
    stack = [validator]
    while stack:
        v = stack.pop()
        if v is None:
            continue
        out.update(getattr(v, "json_schema", {}))
        stack.extend(getattr(v, "_validators", ()) or getattr(v, "validators", ()))
    return out


_JSON_TYPES = {"null": "null", "bool": "boolean", "int": "integer", "float": "number",
               "str": "string"}


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    kind, args = type_shape(tp)
    if kind in _JSON_TYPES:
        return {"type": _JSON_TYPES[kind]}
    if kind == "literal":
        return {"enum": list(args)}
    if kind == "union":
        return {"anyOf": [_type_schema(a, defs) for a in args]}
    if kind == "list":
        return {"type": "array", "items": _type_schema(args[0], defs)}
    if kind == "tuple":
        items = [_type_schema(a, defs) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items),
                "maxItems": len(items)}
    if kind == "dict":
        return {"type": "object", "additionalProperties": _type_schema(args[1], defs)}
    if kind == "class":
        _class_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    raise TypeError(f"no JSON schema for {tp!r}")


def _class_schema(cls: type, defs: dict[str, Any]) -> None:
    if cls.__name__ in defs:
        return
    defs[cls.__name__] = {}  # placeholder against recursion
    props = {}
    default = cls()
    for f in attrs.fields(cls):
        prop = _type_schema(f.type, defs)
        if "$ref" not in prop:
            prop.update(_bounds(f.validator))
            prop["default"] = unstructure(getattr(default, f.name))
        doc = f.metadata.get("doc")
        if doc:
            prop = {**prop, "description": doc}
        props[f.name] = prop
    defs[cls.__name__] = {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        "properties": props,
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a resolved ExperimentConfig (what config.json files hold)."""
    defs: dict[str, Any] = {}
    _class_schema(ExperimentConfig, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gmmt ExperimentConfig",
        **defs.pop(ExperimentConfig.__name__),
        "$defs": defs,
    }
