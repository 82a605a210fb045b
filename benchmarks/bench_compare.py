"""Several trained models on one shared held-out bank, with bootstrap standard errors.

``bench_quality.py`` scores each run on held-out sets drawn with the run's own seed, so two
seeds are also two banks, and the bank alone moves gap_closed by a few hundredths: a set where
EM's restarts all miss a component counts for a lot. This script scores every run given on the
*same* sets, next to EM (the true K, with the first run's validation EM settings) and the
oracle, and resamples the sets (bootstrap) to give each gap_closed a standard error, and each
run's difference from a reference run a paired one (the bank's noise cancels in a difference,
so it is much smaller).
The reference is the first run, or with ``--group-size G`` the first run of each group of G
(e.g. one group per seed: the old and the new recipe trained with that seed).

Usage: ``python benchmarks/bench_compare.py RUN_DIR [RUN_DIR ...] [--group-size G]
[--num-sets 2048] [--seed 777] [--data-preset simple] [--bootstrap 2000] [--json]``
"""

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch
from common import DefaultsHelpFormatter, machine
from tqdm.auto import tqdm

from gmmt import load_model
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.data.gmm import GMMSampler, make_generator
from gmmt.evaluation.baselines import run_baseline
from gmmt.evaluation.held_out import preset_data
from gmmt.evaluation.metrics import centre_mse_per_set, gap_closed

EXIT_USAGE = 2
# Its own stream: the bank shares no set with any run's training, validation or evaluation.
COMPARISON_STREAM = "comparison"
BATCH_SIZE = 32


class UsageError(Exception):
    """A bad argument or run folder, reported in one line with exit code 2."""


def load_runs(runs: list[Path]) -> tuple[ExperimentConfig, list[torch.nn.Module]]:
    """The first run's saved config (for the EM settings) and every run's final model."""
    models = []
    for run in runs:
        try:
            models.append(load_model(run / "final"))
        except (ConfigError, OSError, RuntimeError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"cannot load the final model of {run}: {message}") from None
    return ExperimentConfig.load(runs[0] / "final" / "config.json"), models


def per_set_errors(saved: ExperimentConfig, models: list[torch.nn.Module], data_preset: str,
                   num_sets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE per set of EM [s], the oracle [s] and every model [models, s] on one bank of
    s = ``num_sets`` sets."""
    try:
        sampler = GMMSampler(preset_data(data_preset), seed)
    except (ConfigError, KeyError) as error:
        raise UsageError(str(error)) from None
    em, oracle, model_errors = [], [], []
    starts = range(0, num_sets, BATCH_SIZE)
    for step, start in enumerate(tqdm(starts, desc="sets", unit="batch", file=sys.stderr)):
        batch = sampler.batch(step, min(BATCH_SIZE, num_sets - start), stream=COMPARISON_STREAM)
        for name, out in (("em", em), ("oracle", oracle)):
            result = run_baseline(name, batch, saved.validation.em,
                                  make_generator(seed + 7919 * step))
            out.append(centre_mse_per_set(result.centres, batch.target, batch.mask))
        with torch.no_grad():
            model_errors.append(torch.stack([
                centre_mse_per_set(model(batch.points, batch.mask), batch.target, batch.mask)
                for model in models]))
    return (torch.cat(em).double(), torch.cat(oracle).double(),
            torch.cat(model_errors, dim=1).double())


def mean_gap(model: torch.Tensor, em: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """gap_closed of the MSEs averaged over the last dimension (sets)."""
    return gap_closed(model.mean(-1), em.mean(-1), oracle.mean(-1))


def compare(em: torch.Tensor, oracle: torch.Tensor, models: torch.Tensor, runs: list[str],
            group_size: int, resamples: int) -> list[dict]:
    """Per run: MSE, gap_closed and its bootstrap SE, and (for all but each group's first run)
    the paired difference in gap_closed from its group's first run, with its SE."""
    picks = torch.randint(0, em.numel(), (resamples, em.numel()),
                          generator=torch.Generator().manual_seed(0))
    gaps = mean_gap(models, em, oracle)  # [runs]
    boots = mean_gap(models[:, picks], em[picks], oracle[picks])  # [runs, resamples]
    rows = []
    for i, run in enumerate(runs):
        row = {"run": run, "mse": models[i].mean().item(), "gap_closed": gaps[i].item(),
               "gap_closed_se": boots[i].std().item()}
        ref = i - i % group_size
        if i != ref:
            row["reference"] = runs[ref]
            row["minus_reference"] = (gaps[i] - gaps[ref]).item()
            row["minus_reference_se"] = (boots[i] - boots[ref]).std().item()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="finished runs (their final/ models); the first is the reference")
    parser.add_argument("--group-size", type=int, metavar="G",
                        help="compare each run with the first of its group of G runs "
                             "(default: all runs are one group)")
    parser.add_argument("--num-sets", type=int, default=2048, help="sets in the shared bank")
    parser.add_argument("--seed", type=int, default=777, help="seed of the shared bank")
    parser.add_argument("--data-preset", default="simple", help="prior of the bank")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.num_sets < 2 or args.bootstrap < 2:
        parser.exit(EXIT_USAGE, "error: --num-sets and --bootstrap must be >= 2\n")
    group_size = len(args.runs) if args.group_size is None else args.group_size
    if group_size < 1 or len(args.runs) % group_size:
        parser.exit(EXIT_USAGE, f"error: --group-size {group_size} must be >= 1 and divide the "
                                f"number of runs ({len(args.runs)})\n")
    try:
        saved, models = load_runs(args.runs)
        em, oracle, model_errors = per_set_errors(saved, models, args.data_preset,
                                                  args.num_sets, args.seed)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"error: {error}\n")
    runs = [str(run) for run in args.runs]
    report = {
        "benchmark": "compare", "date": date.today().isoformat(), "machine": machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data_preset": args.data_preset, "sets": args.num_sets, "seed": args.seed,
        "stream": COMPARISON_STREAM, "bootstrap": args.bootstrap,
        "em_mse": em.mean().item(), "oracle_mse": oracle.mean().item(),
        "group_size": group_size,
        "runs": compare(em, oracle, model_errors, runs, group_size, args.bootstrap),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.num_sets} sets of {args.data_preset} (seed {args.seed}): EM "
          f"{report['em_mse']:.7f}, oracle {report['oracle_mse']:.7f}")
    for row in report["runs"]:
        diff = ("" if "reference" not in row else
                f"   minus {row['reference']}: {row['minus_reference']:+.4f} ± "
                f"{row['minus_reference_se']:.4f}")
        print(f"{row['run']}: MSE {row['mse']:.7f}, gap_closed {row['gap_closed']:+.4f} ± "
              f"{row['gap_closed_se']:.4f}{diff}")


if __name__ == "__main__":
    main()
