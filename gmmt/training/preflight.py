"""Checks before a run starts: is this machine able to run it, and in what time?

A preset sized for a GPU (``standard``, ``high_performance``) started on a CPU would otherwise
run silently for days or exhaust the memory. Before anything is written, :func:`preflight`

1. checks that the requested device exists and that fp16 has a CUDA GPU (as the trainer will);
2. estimates the memory of one training step from the model's parameter count (counted on the
   ``meta`` device: nothing is allocated), width, depth, batch size and largest N, and refuses
   a CPU run that needs more than the memory available;
3. on a CPU, times a few training steps on a small batch, projects the run's total and refuses
   beyond ``training.max_cpu_hours``.

Refusals raise :class:`RefusedHere` with advice; ``--allow-slow`` (``allow_slow=True``) skips
2 and 3. Step 1 raises ConfigError like every other configuration mistake.
"""

import math
import os
import sys
import time
from pathlib import Path

from attrs import define, evolve

from gmmt.config.experiment import ExperimentConfig, resolve_mixed_precision
from gmmt.config.fields import ConfigError

# Bytes per (set x point x hidden unit x layer) kept for the backward pass, as 4-byte floats:
# measured on CPU at 80-100 for ff_multiplier 4 (tiny, small and medium models; the attention
# kernels are fused, so nothing grows with N squared), and about 3 floats per unit of the
# feed-forward width.
_ACTIVATION_FLOATS = 12
_FF_FLOATS = 3
_HALF_PRECISION_FACTOR = 0.6  # autocast keeps about this share of float32 activations
_STATE_BYTES = 16  # per parameter: weights, gradients, two AdamW moments (float32)
_EMA_BYTES = 4
_OVERHEAD_BYTES = 512 * 2**20  # the framework itself, the validation bank, the sampler
# The step timing: the first step on _FIRST_SETS sets decides clear cases (projection under a
# tenth of the limit, or beyond ten times it); otherwise _MORE_STEPS steps on up to _MORE_SETS.
_FIRST_SETS = 2
_MORE_SETS = 8
_MORE_STEPS = 2
_CLEAR_FACTOR = 10.0

ADVICE = ("instead: --preset quick_test (about a minute on a CPU), --preset cpu_reference "
          "(about 15 minutes on 2 cores), a GPU (--device cuda), or a smaller run (--set "
          "training.num_epochs=..., training.batch_size=..., --model-preset tiny); "
          "--allow-slow runs it here anyway")


class RefusedHere(Exception):
    """The run would not fit this machine (memory) or would take too long on its CPU."""


@define
class MemoryEstimate:
    """Bytes one training step needs on one process."""

    parameters: int
    state: int  # weights, gradients, optimizer moments, EMA
    activations: int  # kept for the backward pass, at the largest N
    points: int  # the largest N the run draws

    @property
    def total(self) -> int:
        return self.state + self.activations + _OVERHEAD_BYTES


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def run_device(config: ExperimentConfig) -> str:
    """Where the run will compute: ``auto`` is a GPU when one is visible, as Accelerate picks."""
    import torch

    device = config.device.device
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def device_problems(config: ExperimentConfig) -> list[str]:
    """The device and precision checks the trainer makes when it starts (before writing)."""
    import torch

    device = config.device.device
    problems = []
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("device 'cuda' was requested but no CUDA GPU is visible @ $.device.device")
    if device == "mps" and not torch.backends.mps.is_available():
        problems.append("device 'mps' was requested but MPS is not available @ $.device.device")
    if device == "tpu":
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            problems.append("device 'tpu' needs torch_xla (pip install torch_xla) "
                            "@ $.device.device")
    if resolve_mixed_precision(config.device) == "fp16" and run_device(config) != "cuda":
        problems.append("fp16 needs a CUDA GPU and none will be used; use 'bf16' or 'no' "
                        "@ $.device.mixed_precision")
    return problems


def count_parameters_cheaply(config: ExperimentConfig) -> int:
    """The model's parameter count, built on the meta device (no memory, no initialisation:
    a 38M-parameter model takes milliseconds instead of seconds)."""
    import torch

    from gmmt.model.build import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(config.model, config.data.dim,
                                            config.data.max_clusters))


def memory_estimate(config: ExperimentConfig, parameters: int) -> MemoryEstimate:
    """Rough bytes of one training step (see the module constants for where they come from)."""
    t, tr = config.training, config.model.transformer
    points = config.data.max_points
    if t.curriculum.steps:
        points = max(points, round(t.curriculum.sample_count_distribution.support()[1]))
    floats = _ACTIVATION_FLOATS + _FF_FLOATS * tr.ff_multiplier
    activations = 4 * floats * t.batch_size * points * tr.hidden_dim * tr.effective_depth
    if resolve_mixed_precision(config.device) != "no":
        activations = int(activations * _HALF_PRECISION_FACTOR)
    state = parameters * (_STATE_BYTES + (_EMA_BYTES if t.ema.enabled else 0))
    return MemoryEstimate(parameters, state, activations, points)


def available_memory() -> int | None:
    """Bytes of memory available to a new process (MemAvailable; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def local_processes() -> int:
    """Processes of this launch on this machine (each needs its own memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def memory_problem(config: ExperimentConfig, estimate: MemoryEstimate,
                   available: int | None) -> str | None:
    """Why the run does not fit this machine's memory (CPU runs only), or None."""
    if available is None or run_device(config) != "cpu":
        return None
    need = estimate.total * local_processes()
    if need <= available:
        return None
    t = config.training
    return (f"one training step needs about {gib(need)} (model state {gib(estimate.state)} + "
            f"activations {gib(estimate.activations)} for {t.batch_size} sets of up to "
            f"{estimate.points} points through {config.model.transformer.effective_depth} "
            f"layers of width {config.model.transformer.hidden_dim}), but this machine has "
            f"{gib(available)} available")


def time_steps(config: ExperimentConfig) -> tuple[float, str]:
    """Seconds per optimizer step of the full run on this CPU, and how it was measured.

    Steps run on a few sets (scaled up linearly to the batch size, a slight overestimate:
    per-step overheads are scaled too) with the run's model, optimizer and loss. With a
    curriculum its steps are timed separately and weighted by their number.
    """
    import torch

    from gmmt.data.gmm import GMMSampler
    from gmmt.model.build import build_model
    from gmmt.training.losses import compute_loss
    from gmmt.training.optim import build_optimizer

    t = config.training
    model = build_model(config.model, config.data.dim, config.data.max_clusters)
    optimizer = build_optimizer(model, t.optimizer)
    limit_s = (t.max_cpu_hours or math.inf) * 3600

    def one(sampler: GMMSampler, index: int, sets: int) -> float:
        batch = sampler.batch(index, sets)
        start = time.perf_counter()
        pred = model(batch.points, batch.mask, batch.snr_db)
        compute_loss(t.loss, pred, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * t.batch_size / sets * t.gradient_accumulation_steps

    def per_step(sampler: GMMSampler, steps: int) -> tuple[float, str]:
        first = one(sampler, 0, min(t.batch_size, _FIRST_SETS))
        projected = first * steps
        if projected * _CLEAR_FACTOR < limit_s or projected > _CLEAR_FACTOR * limit_s:
            return first, f"1 step of {min(t.batch_size, _FIRST_SETS)} sets"
        sets = min(t.batch_size, _MORE_SETS)
        more = [one(sampler, 1 + i, sets) for i in range(_MORE_STEPS)]
        return sum(more) / len(more), f"{_MORE_STEPS + 1} steps of up to {sets} sets"

    seed = config.device.seed
    main_steps = t.total_steps - t.curriculum.steps
    with torch.random.fork_rng():  # the run's own initialisation is left untouched
        torch.manual_seed(seed)
        seconds, how = per_step(GMMSampler(config.data, seed), max(main_steps, 1))
        total = seconds * main_steps
        if t.curriculum.steps:
            curriculum = GMMSampler(evolve(config.data, sample_count_distribution=(
                t.curriculum.sample_count_distribution)), seed)
            early, _ = per_step(curriculum, t.curriculum.steps)
            total += early * t.curriculum.steps
    return total / max(t.total_steps, 1), how


def format_duration(seconds: float) -> str:
    from gmmt.training.tracking import format_duration as fmt

    return fmt(seconds)


def preflight(config: ExperimentConfig, *, allow_slow: bool = False,
              time_it: bool = True) -> list[str]:
    """Check the run against this machine before anything is written; the lines to print.

    Raises ConfigError (no such device; fp16 without CUDA) or RefusedHere (too little memory, or
    too slow on this CPU, unless ``allow_slow``).
    """
    problems = device_problems(config)
    if problems:
        raise ConfigError(problems, "cannot run this configuration here")
    device = run_device(config)
    estimate = memory_estimate(config, count_parameters_cheaply(config))
    available = available_memory()
    lines = [f"memory: about {gib(estimate.total)} per training step on {device} "
             f"({estimate.parameters:,} parameters, {config.training.batch_size} sets of up to "
             f"{estimate.points} points)" + (f"; {gib(available)} available"
                                             if available and device == "cpu" else "")]
    problem = memory_problem(config, estimate, available)
    if problem and not allow_slow:
        raise RefusedHere(f"{problem}. Stopped before writing anything; {ADVICE}.")
    if problem:
        lines.append(f"warning: {problem}; --allow-slow: running anyway")
    limit = config.training.max_cpu_hours
    # Several processes would each time their own steps and might disagree: none times.
    if (device != "cpu" or not time_it or allow_slow or limit is None
            or local_processes() > 1):
        return lines
    seconds, how = time_steps(config)
    total = seconds * config.training.total_steps
    projection = (f"{config.training.total_steps:,} steps project to about "
                  f"{format_duration(total)} on this CPU ({seconds:.3g} s per step, timed on "
                  f"{how}; training steps only, validation adds to it)")
    if total > limit * 3600:
        raise RefusedHere(f"this run is sized for a GPU: {projection}, more than "
                          f"training.max_cpu_hours={limit:g}. Stopped before writing anything; "
                          f"{ADVICE}.")
    lines.append(f"time: {projection}")
    return lines


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(f"gmmt: {line}", file=sys.stderr, flush=True)
