"""Each DistributionSpec sampler matches its distribution, on large seeded draws."""

import math

import pytest
import torch

from gmmt.config.data import DistributionSpec
from gmmt.data.distributions import sample

DRAWS = 200_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw(spec: DistributionSpec, integer: bool = False, seed: int = 0) -> torch.Tensor:
    return sample(spec, DRAWS, _gen(seed), "cpu", integer=integer)


def _close(value: float, expected: float, std: float, n: int = DRAWS) -> bool:
    """``value`` is an empirical mean of n draws with standard deviation ``std``: 5 sigma."""
    return abs(value - expected) <= 5 * std / math.sqrt(n) + 1e-12


def _phi(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:  # noqa: N802 - the usual name of the normal CDF
    return 0.5 * math.erfc(-x / math.sqrt(2))  # erfc: accurate in the lower tail


def _truncnorm_moments(mean: float, std: float, lo: float, hi: float) -> tuple[float, float]:
    a, b = (lo - mean) / std, (hi - mean) / std
    z = _Phi(-a) - _Phi(-b) if a > 0 else _Phi(b) - _Phi(a)  # no cancellation near 1
    ta = 0.0 if math.isinf(a) else a * _phi(a)
    tb = 0.0 if math.isinf(b) else b * _phi(b)
    shift = (_phi(a) - _phi(b)) / z
    var = std**2 * (1 + (ta - tb) / z - shift**2)
    return mean + std * shift, var


def test_fixed() -> None:
    x = sample(DistributionSpec(type="fixed", value=3.5), (4, 5), _gen(), "cpu")
    assert x.shape == (4, 5) and x.dtype == torch.float32 and bool((x == 3.5).all())
    k = sample(DistributionSpec(type="fixed", value=3.0), 7, _gen(), "cpu", integer=True)
    assert k.dtype == torch.long and k.tolist() == [3] * 7


def test_poisson() -> None:
    x = _draw(DistributionSpec(type="poisson", rate=4.0), integer=True).double()
    assert x.min() >= 0 and bool((x == x.round()).all())
    assert _close(x.mean().item(), 4.0, 2.0)
    assert abs(x.var().item() - 4.0) < 0.1


def test_truncated_poisson_matches_renormalised_pmf() -> None:
    rate, lo, hi = 3.0, 2, 6
    x = _draw(DistributionSpec(type="truncated_poisson", rate=rate, min=lo, max=hi),
              integer=True)
    assert x.min().item() == lo and x.max().item() == hi
    pmf = [rate**j * math.exp(-rate) / math.factorial(j) for j in range(lo, hi + 1)]
    total = sum(pmf)
    for j, p in zip(range(lo, hi + 1), pmf):
        freq = (x == j).double().mean().item()
        q = p / total
        assert _close(freq, q, math.sqrt(q * (1 - q))), (j, freq, q)


def test_truncated_poisson_far_from_rate() -> None:
    """Support far in the tail (pmf ~ 1e-40 there) still samples its renormalised shape."""
    x = _draw(DistributionSpec(type="truncated_poisson", rate=1.0, min=40, max=42), integer=True)
    assert set(x.unique().tolist()) <= {40, 41, 42}
    # pmf ratio p(41)/p(40) = 1/41: the lowest value dominates.
    assert (x == 40).double().mean().item() > 0.95


def test_uniform_continuous() -> None:
    x = _draw(DistributionSpec(type="uniform", min=-1.0, max=3.0)).double()
    assert x.min() >= -1.0 and x.max() <= 3.0
    assert _close(x.mean().item(), 1.0, 4 / math.sqrt(12))
    assert abs(x.var().item() - 16 / 12) < 0.02


def test_uniform_integer_weights_both_ends_equally() -> None:
    x = _draw(DistributionSpec(type="uniform", min=2, max=5), integer=True)
    assert x.dtype == torch.long
    assert sorted(x.unique().tolist()) == [2, 3, 4, 5]
    for j in range(2, 6):
        freq = (x == j).double().mean().item()
        assert _close(freq, 0.25, math.sqrt(0.25 * 0.75)), (j, freq)


def test_uniform_integer_non_integer_bounds() -> None:
    x = _draw(DistributionSpec(type="uniform", min=1.5, max=4.2), integer=True)
    assert sorted(x.unique().tolist()) == [2, 3, 4]


def test_normal() -> None:
    x = _draw(DistributionSpec(type="normal", mean=2.0, std=3.0)).double()
    assert _close(x.mean().item(), 2.0, 3.0)
    assert abs(x.std().item() - 3.0) < 0.03


@pytest.mark.parametrize(("mean", "std", "lo", "hi"), [
    (0.0, 1.0, -1.0, 2.0),   # central
    (10.0, 2.0, 11.0, 30.0),  # one side cut
    (0.0, 1.0, 5.0, 6.0),    # upper tail: naive inverse CDF would collapse to a point
    (0.0, 1.0, -9.0, -8.0),  # lower tail (torch.special.ndtr rounds Phi(-9) to 0)
    (0.0, 1.0, 20.0, 21.0),  # 20 sigma out
    (0.0, 1.0, -2.0, math.inf),  # one-sided
])
def test_truncated_normal(mean: float, std: float, lo: float, hi: float) -> None:
    x = _draw(DistributionSpec(type="truncated_normal", mean=mean, std=std, min=lo,
                               max=hi)).double()
    assert x.min() >= lo and x.max() <= hi and bool(torch.isfinite(x).all())
    expected_mean, expected_var = _truncnorm_moments(mean, std, lo, hi)
    assert _close(x.mean().item(), expected_mean, math.sqrt(expected_var))
    assert abs(x.var().item() / expected_var - 1) < 0.03


def test_truncated_normal_integer_stays_in_bounds() -> None:
    x = _draw(DistributionSpec(type="truncated_normal", mean=3.0, std=5.0, min=1.5, max=6.5),
              integer=True)
    assert sorted(x.unique().tolist()) == [2, 3, 4, 5, 6]


def test_truncated_lognormal() -> None:
    spec = DistributionSpec(type="truncated_lognormal", mean=5.5, std=0.6, min=50, max=1000)
    x = _draw(spec).double()
    assert x.min() >= 50 and x.max() <= 1000
    expected_mean, expected_var = _truncnorm_moments(5.5, 0.6, math.log(50), math.log(1000))
    logs = x.log()
    assert _close(logs.mean().item(), expected_mean, math.sqrt(expected_var))
    assert abs(logs.var().item() / expected_var - 1) < 0.03
    n = _draw(spec, integer=True)
    assert n.dtype == torch.long and n.min() >= 50 and n.max() <= 1000


def test_choice_with_and_without_probs() -> None:
    x = _draw(DistributionSpec(type="choice", values=[1.0, 5.0, 7.5], probs=[0.2, 0.5, 0.3]))
    for v, p in zip([1.0, 5.0, 7.5], [0.2, 0.5, 0.3]):
        assert _close((x == v).double().mean().item(), p, math.sqrt(p * (1 - p)))
    assert set(x.unique().tolist()) == {1.0, 5.0, 7.5}
    y = _draw(DistributionSpec(type="choice", values=[3.0, 4.0]), integer=True)
    assert y.dtype == torch.long
    assert _close((y == 3).double().mean().item(), 0.5, 0.5)


ALL_SPECS = [
    DistributionSpec(type="fixed", value=2.0),
    DistributionSpec(type="poisson", rate=3.0),
    DistributionSpec(type="truncated_poisson", rate=3.0, min=1, max=9),
    DistributionSpec(type="uniform", min=0, max=1),
    DistributionSpec(type="normal", mean=0, std=1),
    DistributionSpec(type="truncated_normal", mean=0, std=1, min=-1, max=1),
    DistributionSpec(type="truncated_lognormal", mean=0, std=1, min=0.5, max=4),
    DistributionSpec(type="choice", values=[1, 2, 3]),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.type)
def test_seeded_by_generator_only(spec: DistributionSpec) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample(spec, (3, 100), _gen(7), "cpu")
    torch.manual_seed(999)  # the global RNG must not matter ...
    b = sample(spec, (3, 100), _gen(7), "cpu")
    assert a.shape == (3, 100) and torch.equal(a, b)
    torch.manual_seed(123)
    sample(spec, 10, _gen(7), "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be touched
    if spec.type != "fixed":
        assert not torch.equal(a, sample(spec, (3, 100), _gen(8), "cpu"))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.type)
def test_empty_shape(spec: DistributionSpec) -> None:
    assert sample(spec, (0,), _gen(), "cpu").shape == (0,)
