"""Building blocks of the config classes: typed, documented, validated fields.

Every config class is declared with :func:`config_class` and its fields with :func:`setting`.
The decorator derives a strict type check from each annotation and runs it (plus the field's
own range validator) on construction *and* on every attribute assignment, so
``cfg.training.num_epochs = "x"`` fails at once, naming the field.

Type annotations in config modules must be real objects (no ``from __future__ import
annotations``): the checks are built from them when the class is created.
"""

import difflib
import types
from collections.abc import Callable, Sequence
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
# Type descriptions and checks derived from annotations.


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def describe_type(tp: Any) -> str:
    """Human wording of an annotation: ``int``, ``one of 'a', 'b'``, ``list of float``."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin is list:
        return f"list of {describe_type(get_args(tp)[0])}"
    if origin is tuple:
        return "list of " + ", ".join(describe_type(a) for a in get_args(tp))
    if origin is dict:
        return f"object with {describe_type(get_args(tp)[1])} values"
    if attrs.has(tp):
        return f"object ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def describe_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


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


def type_problem(value: Any, tp: Any) -> str | None:
    """Return why ``value`` does not fit annotation ``tp`` (``None`` when it fits).

    Strict: bool is not an int, an int is not a str, a float is not an int; an int *is*
    accepted where a float is expected (JSON has one number type).
    """
    origin = get_origin(tp)
    if tp is Any:
        return None
    if tp is type(None):
        return None if value is None else f"expected null, got {describe_value(value)}"
    if origin is Literal:
        choices = get_args(tp)
        if any(_same_literal(value, c) for c in choices):
            return None
        return literal_problem(value, choices)
    if _is_union(tp):
        arms = get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is not type(None) and type_problem(value, arm) is None:
                return None
        return f"expected {describe_type(tp)}, got {describe_value(value)}"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, list):
            return f"expected {describe_type(tp)}, got {describe_value(value)}"
        for i, item in enumerate(value):
            inner = type_problem(item, get_args(tp)[0])
            if inner:
                return f"item {i}: {inner}"
        return None
    elif origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            return f"expected {describe_type(tp)}, got {describe_value(value)}"
        for i, (item, arg) in enumerate(zip(value, args)):
            inner = type_problem(item, arg)
            if inner:
                return f"item {i}: {inner}"
        return None
    elif origin is dict:
        if not isinstance(value, dict):
            return f"expected {describe_type(tp)}, got {describe_value(value)}"
        key_tp, val_tp = get_args(tp)
        for key, item in value.items():
            inner = type_problem(key, key_tp) or type_problem(item, val_tp)
            if inner:
                return f"key {key!r}: {inner}"
        return None
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:  # pragma: no cover - only reached by an annotation we do not support
        raise TypeError(f"unsupported config annotation {tp!r}")
    return None if ok else f"expected {describe_type(tp)}, got {describe_value(value)}"


def coerce(value: Any, tp: Any) -> Any:
    """Lossless widening applied before checks: int -> float, list -> tuple (recursively)."""
    origin = get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _is_union(tp) and value is not None:
        for arm in get_args(tp):
            if arm is not type(None) and type_problem(value, arm) is None:
                return coerce(value, arm)
        return value
    if origin is list and isinstance(value, list):
        return [coerce(v, get_args(tp)[0]) for v in value]
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(get_args(tp)):
        return tuple(coerce(v, a) for v, a in zip(value, get_args(tp)))
    if origin is dict and isinstance(value, dict):
        return {k: coerce(v, get_args(tp)[1]) for k, v in value.items()}
    return value


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


def field_doc(cls: type, name: str) -> str:
    return attrs.fields_dict(cls)[name].metadata.get("doc", "")
