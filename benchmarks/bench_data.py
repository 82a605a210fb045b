"""Data generation rate, and its cost relative to one training step.

For each data preset (simple, standard, complex) this measures, on one device:

* ``sets_per_s`` / ``points_per_s``: :class:`GMMSampler` batches at the matching training
  preset's batch size, over many steps (so N varies as in training);
* ``gen_to_step_ratio``: the time to generate one batch over the time of one training step
  (forward + backward + AdamW, MSE to each point's centre) of the matching model preset on that
  same batch. The big models are too slow on a CPU at their training batch size, so the step is
  timed on a smaller batch (``step_batch``); both times scale about linearly in the batch, so
  the ratio carries over. For ``complex`` the step batch also fixes N at the preset's smallest
  (1500): the step grows faster than linearly in N (attention), generation linearly, so this
  overstates the ratio rather than hiding generation cost.

Usage: ``python benchmarks/bench_data.py [--json] [--presets simple standard] [--threads 2]``
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import date

import attrs
import torch
import torch.nn.functional as F
from common import DefaultsHelpFormatter, machine

from gmmt.config.data import DistributionSpec
from gmmt.config.presets import resolve_config
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler
from gmmt.model.build import build_model, count_parameters

# data preset -> (experiment preset whose model and training batch it pairs with,
#                 sets per timed step on a CPU, fixed N for the timed step or None)
PAIRS: dict[str, tuple[str, int, int | None]] = {
    "simple": ("quick_test", 16, None),       # tiny model, its real training batch
    "standard": ("standard", 4, None),        # medium model
    "complex": ("high_performance", 1, 1500),  # large model: ~1 min per step even so
}


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def generation_rate(sampler: GMMSampler, batch_size: int, steps: int) -> dict[str, float]:
    """Sets and points per second over ``steps`` consecutive training batches."""
    sampler.batch(10**6, batch_size)  # warm-up: first-call allocations
    points = 0
    start = time.perf_counter()
    for step in range(steps):
        points += int(sampler.batch(step, batch_size).point_counts().sum())
    elapsed = time.perf_counter() - start
    return {"batch_size": batch_size, "batches": steps, "seconds": elapsed,
            "sets_per_s": steps * batch_size / elapsed, "points_per_s": points / elapsed}


def step_ratio(experiment: str, sampler: GMMSampler, step_batch: int, steps: int,
               gen_repeats: int, warmup: bool = True) -> dict[str, object]:
    """Generation time of one batch over one training step on that batch."""
    config = resolve_config(experiment).config
    model = build_model(config.model, config.data.dim, config.data.max_clusters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch: GMMBatch = sampler.batch(0, step_batch)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        prediction = model(batch.points, batch.mask, batch.snr_db)
        F.mse_loss(prediction, batch.target).backward()
        optimizer.step()

    if warmup:  # optimizer state, allocator; skipped where one step takes most of a minute
        train_step()
    step_times = _timed(train_step, steps)
    gen_times = _timed(lambda: sampler.batch(0, step_batch), gen_repeats)
    step_s, gen_s = statistics.median(step_times), statistics.median(gen_times)
    return {"experiment": experiment, "model": config.metadata.component_presets["model"],
            "parameters": count_parameters(model), "step_batch": step_batch,
            "step_points": batch.points.shape[1], "step_s": step_s, "gen_s": gen_s,
            "gen_to_step_ratio": gen_s / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--presets", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--gen-steps", type=int, default=50, help="batches for the rate")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="timed training steps (large model: 1, no warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, object] = {}
    for preset in args.presets:
        experiment, step_batch, step_points = PAIRS[preset]
        config = resolve_config(experiment, data=preset).config
        sampler = GMMSampler(config.data, seed=args.seed, device="cpu")
        entry = generation_rate(sampler, config.training.batch_size, args.gen_steps)
        if step_points is not None:
            fixed = DistributionSpec(type="fixed", value=float(step_points))
            sampler = GMMSampler(attrs.evolve(config.data, sample_count_distribution=fixed),
                                 seed=args.seed, device="cpu")
        big = preset == "complex"
        entry.update(step_ratio(experiment, sampler, step_batch, 1 if big else args.train_steps,
                                gen_repeats=20, warmup=not big))
        results[preset] = entry
        if not args.json:
            print(f"{preset:9s} gen {entry['sets_per_s']:9.0f} sets/s "
                  f"{entry['points_per_s']:12.0f} points/s (batch {entry['batch_size']}) | "
                  f"{entry['model']} step {entry['step_s']:8.3f} s on {step_batch}x"
                  f"{entry['step_points']} points, gen {entry['gen_s'] * 1e3:7.2f} ms, "
                  f"ratio {entry['gen_to_step_ratio']:.4%}", flush=True)
    report = {"machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "device": "cpu",
              "date": date.today().isoformat(), "presets": results}
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
