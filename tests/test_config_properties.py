"""Property tests: random valid configs round-trip; a wrong JSON type anywhere is caught at its
path."""

import json
from typing import Any, Literal, get_args, get_origin

import attrs
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gmmt.config.converter import structure, unstructure
from gmmt.config.data import DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError, _is_union
from gmmt.config.overrides import deep_merge, nested

DEFAULT = ExperimentConfig()


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, annotation) of every leaf field; distribution specs count as one leaf."""
    out = []
    for f in attrs.fields(cls):
        path = (*prefix, f.name)
        if attrs.has(f.type) and f.type is not DistributionSpec:
            out.extend(leaves(f.type, path))
        else:
            out.append((path, f.type))
    return out


LEAVES = leaves(ExperimentConfig)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
specs = st.one_of(
    st.builds(lambda v: {"type": "fixed", "value": v}, st.integers(2, 50)),
    st.builds(lambda a, b: {"type": "uniform", "min": min(a, b), "max": max(a, b)},
              st.integers(2, 50), st.integers(2, 50)),
    st.builds(lambda r, a, b: {"type": "truncated_poisson", "rate": r, "min": min(a, b),
                               "max": max(a, b)},
              st.floats(0.1, 20), st.integers(2, 50), st.integers(2, 50)),
    st.builds(lambda m, s, a, b: {"type": "truncated_normal", "mean": m, "std": s,
                                  "min": min(a, b), "max": max(a, b)},
              st.floats(0, 30), st.floats(0.1, 5), st.integers(2, 50), st.integers(2, 50)),
    st.builds(lambda vs: {"type": "choice", "values": vs}, st.lists(st.integers(2, 50),
                                                                    min_size=1, max_size=4)),
)


def values_for(tp: Any) -> st.SearchStrategy:
    origin = get_origin(tp)
    if tp is DistributionSpec:
        return specs
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(0, 10_000)
    if tp is float:
        return finite
    if tp is str:
        return st.text(alphabet="abcxyz019_-", min_size=1, max_size=12)
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if _is_union(tp):
        return st.one_of([values_for(a) if a is not type(None) else st.none()
                          for a in get_args(tp)])
    if origin is list:
        return st.lists(values_for(get_args(tp)[0]), max_size=4, unique=True)
    if origin is tuple:
        return st.tuples(*[values_for(a) for a in get_args(tp)]).map(list)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["model", "data"]), values_for(get_args(tp)[1]),
                               max_size=2)
    raise AssertionError(f"no strategy for {tp!r}")


@st.composite
def edits(draw: st.DrawFn) -> dict:
    chosen = draw(st.lists(st.sampled_from(LEAVES), min_size=1, max_size=6,
                           unique_by=lambda leaf: leaf[0]))
    out: dict = {}
    for path, tp in chosen:
        out = deep_merge(out, nested(list(path), draw(values_for(tp))))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(edits())
def test_valid_configs_round_trip(edit: dict) -> None:
    data = deep_merge(unstructure(DEFAULT), edit)
    try:
        cfg = structure(data, ExperimentConfig)
    except ConfigError:
        assume(False)  # a range or cross-field rule rejected the draw; fine
        raise
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict() == json.loads(json.dumps(cfg.to_dict()))  # already JSON-pure


def wrong_values(tp: Any) -> st.SearchStrategy:
    """JSON values of the wrong type for annotation ``tp`` (never silently coerced)."""
    everything = st.one_of(st.booleans(), st.integers(-5, 5), st.floats(0.5, 9.5),
                           st.text(min_size=1, max_size=5), st.none(),
                           st.lists(st.integers(), max_size=2),
                           st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))

    def fits(v: Any) -> bool:
        from gmmt.config.fields import type_problem

        if tp is DistributionSpec:
            return isinstance(v, (dict, str))  # str is a preset name, resolved before
        return type_problem(v, tp) is None

    return everything.filter(lambda v: not fits(v))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LEAVES).flatmap(lambda leaf: st.tuples(st.just(leaf),
                                                               wrong_values(leaf[1]))))
def test_wrong_type_is_reported_at_its_path(case: tuple) -> None:
    (path, _tp), value = case
    data = deep_merge(unstructure(DEFAULT), nested(list(path), value))
    try:
        structure(data, ExperimentConfig)
    except ConfigError as err:
        where = "$." + ".".join(path)
        assert any(p.split(" @ ")[-1].startswith(where) for p in err.problems), err.problems
    else:
        raise AssertionError(f"{value!r} accepted at {'.'.join(path)}")
