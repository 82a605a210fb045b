"""Vectorised samplers for the one-dimensional :class:`DistributionSpec` families.

Every draw comes from the ``torch.Generator`` passed in, never from torch's global RNG, so a
caller that seeds its generator from (seed, stream, rank, step) gets reproducible data.
Truncated families are sampled exactly by inverse CDF (no rejection loop, no clipping bias).
"""

import math
from collections.abc import Sequence

import torch

from gmmt.config.data import DistributionSpec

Shape = int | Sequence[int]
# Draws that estimate an integer distribution's probabilities when there is no closed form here.
PROBABILITY_DRAWS = 2**22


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the inverse CDFs accurate in the tails; MPS has no float64 at all.
    return torch.float32 if device.type == "mps" else torch.float64


def _integer_bounds(low: float, high: float, what: str) -> tuple[int, int]:
    """The integers inside [low, high]; raises when there are none."""
    lo, hi = math.ceil(low), math.floor(high)
    if lo > hi:
        raise ValueError(f"{what}: no integer lies in [{low:g}, {high:g}]")
    return lo, hi


def _normal_cdf(x: float) -> float:
    """Standard normal CDF via erfc, accurate in the lower tail.

    (``torch.special.ndtr`` goes through erf and loses the lower tail: it returns 0 at -9.)
    """
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _truncated_standard_normal(alpha: float, beta: float, shape: tuple[int, ...],
                               generator: torch.Generator, device: torch.device,
                               dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws restricted to [alpha, beta] (either may be infinite).

    Inverse CDF: p ~ U(Phi(lo), Phi(hi)], x = Phi^-1(p). The interval is mirrored so that its
    mass sits in the lower tail and any infinite end is ``lo``: Phi of a very negative number
    keeps full relative precision (Phi of a large positive one rounds to 1 and loses the
    interval), and p never reaches the infinite end since u is drawn from (0, 1]. Exact to
    float64 precision while the finite bound nearest the mass is within ~37 standard deviations
    of the mean; beyond that Phi underflows and draws fall back to that bound.
    """
    if alpha == -math.inf and beta == math.inf:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    flip = alpha > 0.0 or beta == math.inf
    lo, hi = (-beta, -alpha) if flip else (alpha, beta)  # hi is finite from here on
    cdf_lo, cdf_hi = _normal_cdf(lo), _normal_cdf(hi)
    u = 1.0 - torch.rand(shape, generator=generator, device=device, dtype=dtype)  # (0, 1]
    x = torch.special.ndtri(cdf_lo + (cdf_hi - cdf_lo) * u)
    # Round-off at the ends (or underflow far out in the tail) must not leave [lo, hi].
    x = torch.nan_to_num(x, nan=hi, neginf=hi, posinf=hi).clamp(lo, hi)
    return -x if flip else x


def sample(spec: DistributionSpec, shape: Shape, generator: torch.Generator,
           device: torch.device | str = "cpu", integer: bool = False,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Draw a tensor of ``shape`` i.i.d. values from ``spec``.

    Args:
        spec: the distribution (validated config object).
        shape: output shape.
        generator: the only source of randomness; must live on ``device``.
        device: where the result (and the work) lives.
        integer: integer-valued quantity (K, N). ``uniform`` is then uniform on the integers
            ``ceil(min)..floor(max)`` (both ends equally likely); other continuous families
            are rounded to the nearest integer and kept inside their bounds; ``truncated_poisson``
            is exact on its integer support either way.
        dtype: result dtype; defaults to ``torch.long`` when ``integer`` else the default float.

    Returns:
        Tensor of ``shape`` on ``device``.
    """
    device = torch.device(device)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    out_dtype = dtype or (torch.long if integer else torch.get_default_dtype())
    work = _work_dtype(device)
    kind = spec.type

    if kind == "fixed":
        value = round(spec.value) if integer else spec.value
        return torch.full(shape, value, dtype=out_dtype, device=device)

    if kind == "choice":
        values = torch.tensor(spec.values, dtype=work, device=device)
        probs = (torch.tensor(spec.probs, dtype=work, device=device) if spec.probs is not None
                 else torch.ones_like(values))
        count = math.prod(shape)
        index = torch.multinomial(probs, count, replacement=True, generator=generator) \
            if count else torch.zeros(0, dtype=torch.long, device=device)
        drawn = values[index].reshape(shape)
        return (drawn.round() if integer else drawn).to(out_dtype)

    if kind == "poisson":
        rate = torch.full(shape, spec.rate, dtype=work, device=device)
        return torch.poisson(rate, generator=generator).to(out_dtype)

    if kind == "truncated_poisson":
        lo, hi = _integer_bounds(max(spec.min, 0.0), spec.max, "truncated_poisson")
        support = torch.arange(lo, hi + 1, dtype=work, device=device)
        log_pmf = support * math.log(spec.rate) - torch.lgamma(support + 1.0)
        # Subtracting the peak keeps exp() finite however far the support is from the rate.
        cdf = torch.cumsum(torch.exp(log_pmf - log_pmf.max()), 0)
        u = torch.rand(shape, generator=generator, device=device, dtype=work) * cdf[-1]
        index = torch.searchsorted(cdf, u.reshape(-1), right=True).clamp_(max=hi - lo)
        return support[index].reshape(shape).to(out_dtype)

    if kind == "uniform":
        if integer:
            lo, hi = _integer_bounds(spec.min, spec.max, "uniform")
            return torch.randint(lo, hi + 1, shape, generator=generator,
                                 device=device).to(out_dtype)
        u = torch.rand(shape, generator=generator, device=device, dtype=work)
        drawn = spec.min + (spec.max - spec.min) * u
        return drawn.to(out_dtype)

    if kind == "normal":
        z = torch.randn(shape, generator=generator, device=device, dtype=work)
        drawn = spec.mean + spec.std * z
        return (drawn.round() if integer else drawn).to(out_dtype)

    if kind in ("truncated_normal", "truncated_lognormal"):
        low, high = spec.min, spec.max
        if kind == "truncated_lognormal":
            if high <= 0:
                raise ValueError(f"truncated_lognormal: max must be > 0, got {high:g}")
            # The bounds are on the value; the normal lives on its logarithm.
            low, high = (math.log(low) if low > 0 else -math.inf), math.log(high)
        z = _truncated_standard_normal((low - spec.mean) / spec.std, (high - spec.mean) / spec.std,
                                       shape, generator, device, work)
        drawn = spec.mean + spec.std * z
        if kind == "truncated_lognormal":
            drawn = torch.exp(drawn)
        drawn = drawn.clamp(spec.min, spec.max)  # round-off of mean + std * z at the bounds
        if integer:
            lo, hi = _integer_bounds(spec.min, spec.max, kind)
            drawn = drawn.round().clamp(lo, hi)
        return drawn.to(out_dtype)

    raise ValueError(f"unknown distribution type {kind!r}")  # pragma: no cover


def integer_probabilities(spec: DistributionSpec, high: int) -> torch.Tensor:
    """P(value = 1..high) [high] float64 of an integer quantity drawn from ``spec`` (as
    :func:`sample` draws it with ``integer=True``) and capped at ``high``, as K is.

    Fixed, uniform and choice are exact; the other families are estimated from
    PROBABILITY_DRAWS draws (cached: a spec is immutable, and its repr names every field).
    """
    key = (repr(spec), high)
    if key not in _PROBABILITIES:
        _PROBABILITIES[key] = _integer_probabilities(spec, high)
    return _PROBABILITIES[key].clone()


_PROBABILITIES: dict[tuple[str, int], torch.Tensor] = {}


def _integer_probabilities(spec: DistributionSpec, high: int) -> torch.Tensor:
    values = torch.arange(1, high + 1, dtype=torch.float64)
    if spec.type == "fixed":
        probs = (values == min(round(spec.value), high)).double()
    elif spec.type == "uniform":
        lo, hi = _integer_bounds(spec.min, spec.max, "uniform")
        probs = ((values >= lo) & (values <= min(hi, high))).double()
        probs[-1] += max(0, hi - high)  # values above high are capped at it
    elif spec.type == "choice":
        weights = spec.probs if spec.probs is not None else [1.0] * len(spec.values)
        probs = torch.zeros(high, dtype=torch.float64)
        for value, weight in zip(spec.values, weights):
            probs[min(max(round(value), 1), high) - 1] += weight
    else:
        draws = sample(spec, (PROBABILITY_DRAWS,), torch.Generator().manual_seed(0),
                       integer=True)
        probs = torch.bincount(draws.clamp(1, high) - 1, minlength=high).double()
    return probs / probs.sum()
