"""Building blocks of the config classes: typed, documented, validated fields.

Every config class is declared with :func:`config_class` and its fields with :func:`setting`.
The decorator derives a strict type check from each annotation and runs it (plus the field's
own range validator) on construction *and* on every attribute assignment, so
``cfg.training.num_epochs = "x"`` fails at once, naming the field.

Type annotations in config modules must be real objects (no ``from __future__ import
annotations``): the checks are built from them when the class is created.
"""

import difflib
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

import attrs


class ConfigError(ValueError):
    """A configuration is invalid. ``problems`` holds one ``"message @ $.path"`` line each."""

    def __init__(self, problems: Sequence[str], title: str = "invalid configuration") -> None:
        self.problems = list(problems)
        self.title = title
        super().__init__(title + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class FieldProblem(TypeError, ValueError):
    """One field holds a bad value. ``message`` omits the field name (paths are added later)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# ---------------------------------------------------------------------------------------------
# Annotations. What kind of type an annotation is gets decided here, once (type_shape); the type
# check and widening below, the converter's hooks and the JSON Schema all switch on that answer.

_SCALARS = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str"}
CONTAINERS = ("list", "tuple", "dict")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


@functools.cache
def type_shape(tp: Any) -> tuple[str, tuple[Any, ...]]:
    """``(kind, args)`` of an annotation.

    kind is ``any``, ``null``, ``bool``, ``int``, ``float``, ``str`` (args empty), ``literal``
    (args: the choices), ``union`` (the arms), ``list`` (the item type), ``tuple`` (the item
    types), ``dict`` (key and value types), ``class`` (the attrs config class) or ``other``.
    """
    if tp is Any:
        return "any", ()
    if tp in _SCALARS:
        return _SCALARS[tp], ()
    origin = get_origin(tp)
    if origin is Literal:
        return "literal", get_args(tp)
    if _is_union(tp):
        return "union", get_args(tp)
    if origin in (list, tuple, dict):
        return origin.__name__, get_args(tp)
    if attrs.has(tp):
        return "class", (tp,)
    return "other", ()


def container_items(value: Any, tp: Any) -> list[tuple[Any, Any, Any]] | None:
    """``(index or key, item, item annotation)`` of each item of a list, tuple or dict value;
    ``None`` when ``value`` is not that container (a tuple needs its exact length)."""
    kind, args = type_shape(tp)
    if kind == "list" and isinstance(value, list):
        return [(i, item, args[0]) for i, item in enumerate(value)]
    if kind == "tuple" and isinstance(value, (tuple, list)) and len(value) == len(args):
        return list(zip(range(len(args)), value, args, strict=True))
    if kind == "dict" and isinstance(value, Mapping):
        return [(key, item, args[1]) for key, item in value.items()]
    return None


def rebuild(tp: Any, pairs: list[tuple[Any, Any]]) -> Any:
    """The list, tuple or dict of annotation ``tp`` from ``(index or key, item)`` pairs."""
    kind, _ = type_shape(tp)
    if kind == "dict":
        return dict(pairs)
    items = [item for _, item in pairs]
    return tuple(items) if kind == "tuple" else items


def describe_type(tp: Any) -> str:
    """Human wording of an annotation: ``int``, ``one of 'a', 'b'``, ``list of float``."""
    kind, args = type_shape(tp)
    if kind == "literal":
        return "one of " + ", ".join(repr(a) for a in args)
    if kind == "union":
        return " or ".join(describe_type(a) for a in args)
    if kind in ("list", "tuple"):
        return "list of " + ", ".join(describe_type(a) for a in args)
    if kind == "dict":
        return f"object with {describe_type(args[1])} values"
    if kind == "class":
        return f"object ({tp.__name__})"
    return _SCALARS.get(tp) or getattr(tp, "__name__", repr(tp))


def describe_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def mismatch(value: Any, tp: Any) -> str:
    """``expected <type>, got <value>``."""
    return f"expected {describe_type(tp)}, got {describe_value(value)}"


def close_matches(word: str, choices: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)


def literal_problem(value: Any, choices: Sequence[Any]) -> str:
    """Message for a value outside a set of choices, with a close-match hint for strings."""
    text = f"expected one of {', '.join(repr(c) for c in choices)}; got {value!r}"
    if isinstance(value, str):
        hint = close_matches(value, [c for c in choices if isinstance(c, str)])
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
    return text


def _same_literal(value: Any, choice: Any) -> bool:
    return type(value) is type(choice) and value == choice


def _is_instance(value: Any, tp: type) -> bool:
    """isinstance as JSON sees it: a bool is no number, and an int is also a float."""
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float) if tp is float else tp)


def type_problem(value: Any, tp: Any) -> str | None:
    """Return why ``value`` does not fit annotation ``tp`` (``None`` when it fits).

    Strict: bool is not an int, an int is not a str, a float is not an int; an int *is*
    accepted where a float is expected (JSON has one number type).
    """
    kind, args = type_shape(tp)
    if kind == "any":
        return None
    if kind == "literal":
        return None if any(_same_literal(value, c) for c in args) else literal_problem(value, args)
    if kind == "union":
        return None if any(type_problem(value, a) is None for a in args) else mismatch(value, tp)
    if kind in CONTAINERS:
        items = container_items(value, tp)
        if items is None:
            return mismatch(value, tp)
        label = "key" if kind == "dict" else "item"
        for key, item, item_tp in items:
            inner = (kind == "dict" and type_problem(key, args[0])) or type_problem(item, item_tp)
            if inner:
                return f"{label} {key!r}: {inner}"
        return None
    return None if _is_instance(value, tp) else mismatch(value, tp)


def coerce(value: Any, tp: Any) -> Any:
    """Lossless widening applied before checks: int -> float, list -> tuple (recursively)."""
    kind, args = type_shape(tp)
    if kind == "float" and _is_instance(value, int):
        return float(value)
    if kind == "union":
        arm = next((a for a in args if type_problem(value, a) is None), None)
        return value if arm is None else coerce(value, arm)
    items = container_items(value, tp)
    if items is None:
        return value
    return rebuild(tp, [(key, coerce(item, item_tp)) for key, item, item_tp in items])


def _type_validator(tp: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        problem = type_problem(value, tp)
        if problem:
            raise FieldProblem(attribute.name, problem)

    return check


def _add_type_checks(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    out = []
    for f in fields:
        validators = [_type_validator(f.type)]
        if f.validator is not None:
            validators.append(f.validator)
        out.append(
            f.evolve(
                validator=attrs.validators.and_(*validators),
                converter=(lambda v, _tp=f.type: coerce(v, _tp)),
            )
        )
    return out


def config_class(cls: type) -> type:
    """Declare a config class: slotted attrs class, keyword-only, checked on every assignment."""
    return attrs.define(cls, kw_only=True, field_transformer=_add_type_checks)


def setting(default: Any = attrs.NOTHING, doc: str = "", *validators: Callable,
            factory: Callable[[], Any] | None = None,
            checks: Sequence[Callable] = ()) -> Any:
    """A config field with a default (or ``factory``), a one-line ``doc`` and range checks."""
    all_checks = list(validators) + list(checks)
    return attrs.field(
        default=default,
        factory=factory,
        validator=all_checks or None,
        metadata={"doc": doc},
    )


# ---------------------------------------------------------------------------------------------
# Range validators (they run after the type check, so the type is already right).


def _bound(op: str, limit: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    tests = {">": lambda v: v > limit, ">=": lambda v: v >= limit,
             "<": lambda v: v < limit, "<=": lambda v: v <= limit}
    test = tests[op]

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not test(value):
            raise FieldProblem(attribute.name, f"must be {op} {limit}, got {value!r}")

    keyword = {">": "exclusiveMinimum", ">=": "minimum", "<": "exclusiveMaximum",
               "<=": "maximum"}[op]
    check.json_schema = {keyword: limit}  # type: ignore[attr-defined]  # read by schema.py
    return check


def greater_than(limit: float) -> Callable:
    return _bound(">", limit)


def at_least(limit: float) -> Callable:
    return _bound(">=", limit)


def less_than(limit: float) -> Callable:
    return _bound("<", limit)


def at_most(limit: float) -> Callable:
    return _bound("<=", limit)


positive = greater_than(0)
non_negative = at_least(0)


def unique_items(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and len(set(value)) != len(value):
        raise FieldProblem(attribute.name, f"items must be unique, got {value!r}")


def non_empty(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and len(value) == 0:
        raise FieldProblem(attribute.name, "must not be empty")


def each_item(*checks: Callable) -> Callable:
    """Apply range checks to every item of a list field."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        for i, item in enumerate(value or []):
            for c in checks:
                try:
                    c(instance, attribute, item)
                except FieldProblem as err:
                    raise FieldProblem(attribute.name, f"item {i}: {err.message}") from None

    return check


# ---------------------------------------------------------------------------------------------
# Cross-field rules: a class may define ``_problems(self) -> list[tuple[str, str]]`` returning
# (field path relative to the class, message) pairs.


def collect_problems(config: Any, path: str = "$") -> list[str]:
    """Every field and cross-field problem in a config tree, as ``"message @ $.path"`` lines.

    Field checks already ran on assignment; they run again here because lists can be mutated in
    place (``cfg.validation.baselines.append("x")``) without any assignment.
    """
    problems: list[str] = []
    for f in attrs.fields(type(config)):
        value = getattr(config, f.name)
        sub = f"{path}.{f.name}"
        if attrs.has(type(value)):
            problems.extend(collect_problems(value, sub))
            continue
        if f.validator is not None:
            try:
                f.validator(config, f, value)
            except FieldProblem as err:
                problems.append(f"{err.message} @ {sub}")
    own = getattr(config, "_problems", None)
    if own is not None:
        problems.extend(f"{message} @ {path}.{field}" for field, message in own())
    return problems
