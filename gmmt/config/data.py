"""Data configuration: the random-GMM prior sets are drawn from, and distribution specs."""

import math
from typing import Literal

import attrs

from gmmt.config.fields import config_class, non_empty, positive, setting

DistributionType = Literal[
    "fixed", "poisson", "truncated_poisson", "uniform", "normal", "truncated_normal",
    "truncated_lognormal", "choice",
]

# Which parameters each distribution type needs; every other parameter must be left out.
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "poisson": ("rate",),
    "truncated_poisson": ("rate", "min", "max"),
    "uniform": ("min", "max"),
    "normal": ("mean", "std"),
    "truncated_normal": ("mean", "std", "min", "max"),
    "truncated_lognormal": ("mean", "std", "min", "max"),
    "choice": ("values",),
}
OPTIONAL_PARAMS: dict[str, tuple[str, ...]] = {"choice": ("probs",)}
PARAM_NAMES = ("value", "rate", "mean", "std", "min", "max", "values", "probs")


@config_class
class DistributionSpec:
    """A one-dimensional distribution, e.g. ``{"type": "uniform", "min": 2, "max": 4}``.

    Integer quantities (cluster count K, point count N) round draws to the nearest integer;
    ``uniform`` on them is inclusive of both ends. ``truncated_lognormal`` takes ``mean`` and
    ``std`` of the logarithm. ``choice`` draws from ``values`` with ``probs`` (uniform if absent).
    """

    type: DistributionType = setting("fixed", "distribution family")
    value: float | None = setting(None, "fixed: the value")
    rate: float | None = setting(None, "poisson / truncated_poisson: the mean (lambda)", positive)
    mean: float | None = setting(None, "normal family: mean (of the log for lognormal)")
    std: float | None = setting(None, "normal family: standard deviation", positive)
    min: float | None = setting(None, "lower bound (inclusive)")
    max: float | None = setting(None, "upper bound (inclusive)")
    values: list[float] | None = setting(None, "choice: the possible values", non_empty)
    probs: list[float] | None = setting(None, "choice: their probabilities (sum to 1)")

    def _problems(self) -> list[tuple[str, str]]:
        required = REQUIRED_PARAMS[self.type]
        allowed = required + OPTIONAL_PARAMS.get(self.type, ())
        out = []
        for name in PARAM_NAMES:
            present = getattr(self, name) is not None
            if name in required and not present:
                out.append((name, f"required for type {self.type!r} (needs {', '.join(required)})"))
            elif present and name not in allowed:
                out.append((name, f"not used by type {self.type!r} "
                            f"(it takes {', '.join(allowed)})"))
        if self.min is not None and self.max is not None and self.min > self.max:
            out.append(("min", f"min ({self.min:g}) must be <= max ({self.max:g})"))
        if self.probs is not None:
            if self.values is not None and len(self.probs) != len(self.values):
                out.append(("probs", f"has {len(self.probs)} entries but values has "
                            f"{len(self.values)}"))
            if any(p < 0 for p in self.probs):
                out.append(("probs", "probabilities must be >= 0"))
            elif abs(sum(self.probs) - 1.0) > 1e-6:
                out.append(("probs", f"probabilities must sum to 1, they sum to "
                            f"{sum(self.probs):.6g}"))
        return out

    def support(self) -> tuple[float, float]:
        """Smallest and largest value a draw can take (``inf`` where unbounded)."""
        if self.type == "fixed":
            return (self.value, self.value)
        if self.type == "choice":
            return (min(self.values), max(self.values))
        if self.type == "poisson":
            return (0.0, math.inf)
        if self.type == "normal":
            return (-math.inf, math.inf)
        return (self.min, self.max)


def count_problems(spec: DistributionSpec, lowest: int) -> list[str]:
    """Why ``spec`` cannot draw an integer count >= ``lowest`` with a finite maximum (K or N).

    Problems of the spec itself are left to its own checks (reported once, on the spec).
    """
    if spec._problems():
        return []
    lo, hi = spec.support()
    out = []
    if lo < lowest:
        fix = {"fixed": f"set value >= {lowest}", "choice": f"use values >= {lowest}"}.get(
            spec.type, "use a type with min" if spec.min is None else f"set min >= {lowest}")
        out.append(f"can draw {lo:g}, but must stay >= {lowest}; {fix}")
    if math.isinf(hi):
        out.append("is unbounded; use a type with max (e.g. truncated_poisson)")
    elif math.ceil(lo) > math.floor(hi):
        out.append(f"holds no integer between {lo:g} and {hi:g}")
    return out


def _uniform(lo: float, hi: float) -> DistributionSpec:
    return DistributionSpec(type="uniform", min=lo, max=hi)


@config_class
class DataConfig:
    """The prior over sets: how many clusters, how noisy, how many points, in which dimension."""

    dim: int = setting(2, "dimension d of each point", positive)
    cluster_params: DistributionSpec = setting(
        doc="number of mixture components K per set (integer, >= 2)",
        factory=lambda: _uniform(2, 4))
    snr_db_params: DistributionSpec = setting(
        doc="signal-to-noise ratio in dB per set (signal = weighted variance of the centres)",
        factory=lambda: _uniform(12, 17))
    sample_count_distribution: DistributionSpec = setting(
        doc="number of points N (integer, >= 1); one N per batch unless ragged",
        factory=lambda: _uniform(100, 500))
    ragged: bool = setting(
        False, "draw N per set and pad with a mask (slower); else one N per batch")
    center_scale: float = setting(1.0, "centres are drawn from N(0, center_scale^2 I)", positive)
    weight_concentration: float = setting(
        5.0, "Dirichlet concentration alpha of the mixture weights (large = equal weights)",
        positive)

    def _problems(self) -> list[tuple[str, str]]:
        return [(name, message)
                for name, lowest in (("cluster_params", 2), ("sample_count_distribution", 1))
                for message in count_problems(getattr(self, name), lowest)]

    @property
    def max_clusters(self) -> int:
        """K_max: the largest K the cluster distribution can draw (centre tensors pad to it)."""
        return round(self.cluster_params.support()[1])

    @property
    def max_points(self) -> int:
        """The largest N the sample-count distribution can draw."""
        return round(self.sample_count_distribution.support()[1])


# The fields holding a distribution. Each name also has presets in data_params/<name>/, and a layer
# that gives one of them a new ``type`` replaces it whole, wherever it sits (the training
# curriculum has a sample_count_distribution too).
DISTRIBUTION_FIELDS = tuple(f.name for f in attrs.fields(DataConfig) if f.type is DistributionSpec)
