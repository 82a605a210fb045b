"""JSON Schema (draft 2020-12) of ExperimentConfig, for editors and validators."""

from typing import Any, Literal, get_args, get_origin

import attrs

from gmmt.config.converter import unstructure
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import _is_union


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


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(tp)
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if _is_union(tp):
        return {"anyOf": [_type_schema(a, defs) for a in get_args(tp)]}
    if origin is list:
        return {"type": "array", "items": _type_schema(get_args(tp)[0], defs)}
    if origin is tuple:
        items = [_type_schema(a, defs) for a in get_args(tp)]
        return {"type": "array", "prefixItems": items, "minItems": len(items),
                "maxItems": len(items)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(get_args(tp)[1], defs)}
    if attrs.has(tp):
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
