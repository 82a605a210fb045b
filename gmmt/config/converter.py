"""The one strict cattrs converter, and error reporting with JSON paths.

Strict means: no extra keys, and no silent coercion between JSON types (``"5"`` is not 5,
``3.7`` is not 3, ``null`` is not ``"None"``, ``true`` is not 1). The only widening is int ->
float. Every problem in a document is reported at once, each as ``message @ $.json.path``.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cattrs import Converter
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.v import format_exception as cattrs_format_exception
from cattrs.v import transform_error

from gmmt.config.data import DistributionSpec
from gmmt.config.fields import (
    CONTAINERS,
    ConfigError,
    FieldProblem,
    close_matches,
    coerce,
    collect_problems,
    container_items,
    describe_value,
    mismatch,
    rebuild,
    type_problem,
    type_shape,
)

T = TypeVar("T")


class _ValueProblem(ValueError):
    """A value-level problem raised while structuring (message only; the path comes later)."""


def _leaf_hook(tp: Any) -> Any:
    def hook(value: Any, _: Any) -> Any:
        problem = type_problem(value, tp)
        if problem:
            raise _ValueProblem(problem)
        return coerce(value, tp)

    return hook


def _with_note(exc: Exception, note: str) -> Exception:
    exc.add_note(note)
    return exc


def _kind(tp: Any) -> str:
    return type_shape(tp)[0]


_SCALAR_KINDS = ("bool", "int", "float", "str", "literal")


def _scalar_union(tp: Any) -> bool:
    kind, args = type_shape(tp)
    return kind == "union" and all(_kind(a) in _SCALAR_KINDS for a in args)


def _make_converter() -> Converter:
    conv = Converter(forbid_extra_keys=True, detailed_validation=True)

    def container_hook(tp: Any) -> Any:
        """Structure every item of a list, tuple or dict, collecting each failure at its index
        or key."""
        kind, args = type_shape(tp)

        def hook(value: Any, _: Any) -> Any:
            items = container_items(value, tp)
            if items is None:
                raise _ValueProblem(mismatch(value, tp))
            out, errors = [], []
            for key, item, item_tp in items:
                try:
                    done_key = conv.structure(key, args[0]) if kind == "dict" else key
                    out.append((done_key, conv.structure(item, item_tp)))
                except Exception as exc:
                    note = IterableValidationNote(f"{kind} item {key!r}", key, item_tp)
                    errors.append(_with_note(exc, note))
            if errors:
                raise IterableValidationError(f"invalid {kind}", errors, tp)
            return rebuild(tp, out)

        return hook

    for tp in (type(None), int, float, str, bool):  # by type: a factory loses to cattrs hooks
        conv.register_structure_hook(tp, _leaf_hook(tp))
    conv.register_structure_hook_factory(lambda t: _kind(t) == "literal", _leaf_hook)
    # Unions of scalars and literals without null (``Literal["no", "bf16"] | bool``) have no
    # cattrs hook; optional fields (``X | None``) keep cattrs' own handling and its messages.
    conv.register_structure_hook_factory(_scalar_union, _leaf_hook)
    conv.register_structure_hook_factory(lambda t: _kind(t) in CONTAINERS, container_hook)
    conv.register_structure_hook_factory(attrs.has, lambda cls: _attrs_hook(conv, cls))

    conv.register_unstructure_hook_factory(
        lambda t: t is tuple or _kind(t) == "tuple", lambda _t: lambda v: list(v))
    conv.register_unstructure_hook(
        DistributionSpec,
        lambda spec: {f.name: conv.unstructure(getattr(spec, f.name))
                      for f in attrs.fields(DistributionSpec)
                      if getattr(spec, f.name) is not None})
    return conv


def _attrs_hook(conv: Converter, cls: type) -> Any:
    """Structure a config class: every field, then range checks, then cross-field rules.

    All problems found at one level are raised together; nested classes contribute theirs.
    """
    fields = attrs.fields(cls)
    names = [f.name for f in fields]

    def note(exc: Exception, name: str, tp: Any) -> Exception:
        return _with_note(exc, AttributeValidationNote(f"field {name}", name, tp))

    def hook(data: Any, _: Any) -> Any:
        if not isinstance(data, Mapping):
            raise _ValueProblem(f"expected an object ({cls.__name__}), got {describe_value(data)}")
        errors: list[Exception] = []
        extra = {k for k in data if k not in names}
        if extra:
            errors.append(ForbiddenExtraKeysError(None, cls, extra))
        kwargs = {}
        for f in fields:
            if f.name in data:
                try:
                    kwargs[f.name] = conv.structure(data[f.name], f.type)
                except Exception as exc:
                    errors.append(note(exc, f.name, f.type))
        if errors:
            raise ClassValidationError(f"invalid {cls.__name__}", errors, cls)
        with attrs.validators.disabled():
            instance = cls(**kwargs)
        for f in fields:
            try:
                f.validator(instance, f, getattr(instance, f.name))
            except FieldProblem as exc:
                errors.append(note(exc, f.name, f.type))
        if not errors and hasattr(instance, "_problems"):
            for path, message in instance._problems():
                errors.append(note(FieldProblem(path, message), path, None))
        if errors:
            raise ClassValidationError(f"invalid {cls.__name__}", errors, cls)
        return instance

    return hook


def _format(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, FieldProblem):
        return exc.message
    if isinstance(exc, _ValueProblem):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        accepted = [f.name for f in attrs.fields(exc.cl)]
        aliases: dict[str, str] = getattr(exc.cl, "KEY_ALIASES", {})
        parts = []
        for key in sorted(exc.extra_fields):
            hint = close_matches(key, accepted + list(aliases))
            suggestion = aliases.get(hint[0], hint[0]) if hint else None
            parts.append(f"{key} (did you mean {suggestion!r}?)" if suggestion else key)
        return f"extra fields found ({', '.join(parts)}); accepted: {', '.join(accepted)}"
    return cattrs_format_exception(exc, tp)


CONVERTER = _make_converter()


def structure(data: Any, cls: type[T]) -> T:
    """Strictly build ``cls`` from plain data; raise ConfigError with every problem's path."""
    try:
        return CONVERTER.structure(data, cls)
    except (ClassValidationError, IterableValidationError, _ValueProblem) as exc:
        raise ConfigError(transform_error(exc, "$", _format)) from None


def unstructure(config: Any) -> Any:
    """Plain JSON-ready data (dicts, lists, numbers, strings) from a config object."""
    return CONVERTER.unstructure(config)


def check(config: Any) -> None:
    """Re-run every field and cross-field check on a built config; raise ConfigError."""
    problems = collect_problems(config)
    if problems:
        raise ConfigError(problems)


def load_json(path: Path) -> Any:
    """Read a JSON file; a syntax error becomes a ConfigError naming file, line and column."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], "cannot read config") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}"],
                          "invalid JSON") from None
