"""Scores of a model and its baselines, nested group -> method -> metric.

A *group* is a set of validation sets: all of them, or one bin of a breakdown (``by_snr``,
``by_k``, ``by_sep``). A *method* is ``"model"`` or a baseline's name. Everything inside gmmt
passes these nested dicts around; flat keys (``by_sep.6_12.baselines.em.mse``) are made only
by :meth:`Results.flat`, for metrics.jsonl and the trackers.
"""

import math
from collections.abc import Iterator, Mapping
from typing import Any

from attrs import define, field

MODEL = "model"
BREAKDOWNS = ("by_snr", "by_k", "by_sep")

# method -> metric -> value
Scores = dict[str, dict[str, float]]


def bin_edges(label: str) -> tuple[float, float] | None:
    """(low, high) of a breakdown bin label (``"3.0_5.8"``, ``"-2_4"``, ``"12_inf"``; a K such
    as ``"3"`` gives (3, 3)); None if it is not one or two numbers joined by ``_``."""
    parts = label.split("_")
    try:
        edges = [float(p) for p in parts]
    except ValueError:
        return None
    if len(edges) > 2 or any(math.isnan(e) for e in edges):
        return None
    return edges[0], edges[-1]


def bin_sort_key(label: str) -> tuple[tuple[float, float], str]:
    """Sort bins by their edges (numeric labels first)."""
    return bin_edges(label) or (math.inf, math.inf), label


@define
class Results:
    """Averaged scores of one validation or evaluation bank.

    ``overall`` holds all ``num_sets`` sets; ``breakdowns[kind][label]`` one bin of a breakdown
    (bins without sets are left out) and ``counts[kind][label]`` its number of sets.
    """

    overall: Scores
    breakdowns: dict[str, dict[str, Scores]] = field(factory=dict)
    counts: dict[str, dict[str, int]] = field(factory=dict)
    num_sets: int = 0

    @property
    def model(self) -> dict[str, float]:
        """The model's overall metrics."""
        return self.overall.get(MODEL, {})

    def _prefixed_groups(self) -> Iterator[tuple[str, Scores]]:
        """(flat-key prefix, scores) of every group: ``""`` first, then ``"by_snr.12_13."``..."""
        yield "", self.overall
        for kind, bins in self.breakdowns.items():
            for label, scores in bins.items():
                yield f"{kind}.{label}.", scores

    def flat(self) -> dict[str, float]:
        """Tracker keys: ``mse``, ``baselines.em.mse``, ``by_snr.12_13.mse``, ..."""
        out: dict[str, float] = {}
        for prefix, scores in self._prefixed_groups():
            for method, values in scores.items():
                middle = "" if method == MODEL else f"baselines.{method}."
                out.update({f"{prefix}{middle}{metric}": v for metric, v in values.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """The summary.json / evaluation.json layout::

            {"model": {...}, "baselines": {name: {...}},
             "by_snr": {"<lo>_<hi>": {"model": {...}, "baselines": {...}}}, ...,
             "sets_per_bin": {"by_snr": {"<lo>_<hi>": 410, ...}, ...}}

        (breakdowns and ``sets_per_bin`` only when computed).
        """

        def split(scores: Scores) -> dict[str, Any]:
            return {"model": scores.get(MODEL, {}),
                    "baselines": {n: v for n, v in scores.items() if n != MODEL}}

        out = split(self.overall)
        for kind, bins in self.breakdowns.items():
            out[kind] = {label: split(scores) for label, scores in bins.items()}
        if self.counts:
            out["sets_per_bin"] = self.counts
        if self.num_sets:
            out["num_sets"] = self.num_sets
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Results":
        """Read back :meth:`to_json`'s layout (a run's summary.json, an evaluation.json)."""

        def join(group: Mapping[str, Any]) -> Scores:
            own = {MODEL: dict(group["model"])} if "model" in group else {}
            return own | {n: dict(v) for n, v in group.get("baselines", {}).items()}

        breakdowns = {kind: {label: join(g) for label, g in data[kind].items()}
                      for kind in BREAKDOWNS if kind in data}
        counts = {kind: dict(bins) for kind, bins in data.get("sets_per_bin", {}).items()}
        return cls(join(data), breakdowns, counts, int(data.get("num_sets", 0)))
