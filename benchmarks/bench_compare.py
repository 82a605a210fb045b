"""Several trained models on one shared held-out bank, against the floor, with bootstrap SEs.

``bench_quality.py`` scores each run on held-out sets drawn with the run's own seed, so two
seeds are also two banks. This script scores every run given on the *same* sets (stream
"comparison"), each run three ways: its raw predictions (``model``), refined by tied EM from its
clusters with its own K (``refined``) and told the true K (``refined_told_k``); beside the Bayes
floor (told K and sigma), the floor told sigma but not K, tied-variance EM (told K), EM
choosing K by BIC, EM and the oracle,
with the first run's validation settings. It resamples the sets (bootstrap) to give:

* each method's excess over the floor, MSE / MSE_bayes - 1, and over the floor not told K
  (``bayes_unknown_k``, told sigma only), each with a standard error;
* each method's difference from tied EM, MSE / MSE_em_tied - 1, a paired one (the bank's noise
  largely cancels in a ratio on the same sets);
* each raw model's gap_closed against EM and the oracle (older tables use it), and with
  ``--group-size G`` its paired difference from the first run of its group of G;
* per SNR bin, each method's excess over both floors (the runs: their mean) with SEs over the
  bin's sets, and the K accuracy of the methods that choose K (the runs' raw count: the count
  head, else the grouping of the predictions; and their refined one).

Usage: ``python benchmarks/bench_compare.py RUN_DIR [RUN_DIR ...] [--group-size G]
[--num-sets 2048] [--seed 777] [--data-preset simple] [--refine 20] [--bootstrap 2000]
[--json] [--save FILE]``
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
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler, make_generator
from gmmt.evaluation.baselines import run_baseline
from gmmt.evaluation.held_out import preset_data
from gmmt.evaluation.metrics import (
    centre_mse_per_set,
    gap_closed,
    snr_bin_index,
    snr_bin_labels,
    snr_bins,
)
from gmmt.evaluation.refine import model_k, refine, refine_unknown_k, run_model

EXIT_USAGE = 2
# Its own stream: the bank shares no set with any run's training, validation or evaluation.
COMPARISON_STREAM = "comparison"
BATCH_SIZE = 32
YARDSTICKS = ("bayes", "bayes_unknown_k", "em_tied", "em_bic", "em", "oracle")
RUN_METHODS = ("model", "refined", "refined_told_k")
# The methods that choose K, whose count is scored: yardsticks, and each run's two.
COUNTING_YARDSTICKS = ("bayes_unknown_k", "em_bic")
COUNTING_RUN_METHODS = ("model", "refined")
SNR_BINS = 5


class Bank:
    """Per-set results on the comparison bank, s sets: each yardstick's MSE and whether its K
    is right ({name: [s]}), each run's ([runs, methods, s]), and each set's SNR bin [s]."""

    def __init__(self, yardsticks: dict[str, torch.Tensor], runs: torch.Tensor,
                 yardstick_k_right: dict[str, torch.Tensor], run_k_right: torch.Tensor,
                 snr_bin: torch.Tensor, bin_labels: list[str]) -> None:
        self.yardsticks, self.runs = yardsticks, runs
        self.yardstick_k_right, self.run_k_right = yardstick_k_right, run_k_right
        self.snr_bin, self.bin_labels = snr_bin, bin_labels


class UsageError(Exception):
    """A bad argument or run folder, reported in one line with exit code 2."""


def load_runs(runs: list[Path]) -> tuple[ExperimentConfig, list[torch.nn.Module]]:
    """The first run's saved config (for the yardsticks' settings) and every run's final
    model."""
    models = []
    for run in runs:
        try:
            models.append(load_model(run / "final"))
        except (ConfigError, OSError, RuntimeError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"cannot load the final model of {run}: {message}") from None
    return ExperimentConfig.load(runs[0] / "final" / "config.json"), models


def per_set_errors(saved: ExperimentConfig, models: list[torch.nn.Module], data_preset: str,
                   num_sets: int, seed: int, iterations: int) -> Bank:
    """MSE per set of every yardstick and of every run's methods (RUN_METHODS), whether each
    counting method's K is right, and each set's SNR bin, on one bank of ``num_sets`` sets."""
    try:
        data = preset_data(data_preset)
        sampler = GMMSampler(data, seed)
    except (ConfigError, KeyError) as error:
        raise UsageError(str(error)) from None
    edges = snr_bins(data.snr_db_params, SNR_BINS)
    yardsticks: dict[str, list[torch.Tensor]] = {name: [] for name in YARDSTICKS}
    yardstick_k: dict[str, list[torch.Tensor]] = {name: [] for name in COUNTING_YARDSTICKS}
    runs: list[torch.Tensor] = []
    run_k: list[torch.Tensor] = []
    bins: list[torch.Tensor] = []
    starts = range(0, num_sets, BATCH_SIZE)
    for step, start in enumerate(tqdm(starts, desc="sets", unit="batch", file=sys.stderr)):
        batch = sampler.batch(step, min(BATCH_SIZE, num_sets - start), stream=COMPARISON_STREAM)

        def error(centres: torch.Tensor, batch: GMMBatch = batch) -> torch.Tensor:
            return centre_mse_per_set(centres, batch.target, batch.mask)

        for name in YARDSTICKS:
            result = run_baseline(name, batch, saved.validation.em,
                                  make_generator(seed + 7919 * step), saved.validation.bayes)
            yardsticks[name].append(error(result.centres))
            if name in COUNTING_YARDSTICKS:
                yardstick_k[name].append(result.k_hat == batch.k)
        bins.append(snr_bin_index(batch.snr_db, edges))
        rows, k_rows = [], []
        for model in models:
            with torch.no_grad():
                pred, probs = run_model(model, batch.points, batch.mask)
            generator = make_generator(seed + 104729 * step)
            own = refine_unknown_k(batch.points, pred, probs, batch.mask,
                                   iterations=iterations, generator=generator)
            told = refine(batch.points, pred, batch.k, batch.mask, iterations=iterations,
                          generator=generator)
            rows.append(torch.stack([error(pred), error(own.centres), error(told.centres)]))
            k_rows.append(torch.stack([model_k(pred, batch.points, batch.mask, probs) == batch.k,
                                       own.k_hat == batch.k]))
        runs.append(torch.stack(rows))
        run_k.append(torch.stack(k_rows))
    return Bank({name: torch.cat(v).double() for name, v in yardsticks.items()},
                torch.cat(runs, dim=-1).double(),
                {name: torch.cat(v).double() for name, v in yardstick_k.items()},
                torch.cat(run_k, dim=-1).double(), torch.cat(bins), snr_bin_labels(edges))


def ratio_minus_one(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """MSE ratio - 1 of set-averaged errors (last dimension: sets)."""
    return top.mean(-1) / bottom.mean(-1) - 1


def by_snr(bank: Bank, resamples: int) -> dict:
    """Per SNR bin: each yardstick's and the runs' mean (each set's error averaged over the runs)
    excess over both floors with bootstrap SEs over the bin's sets, and each counting method's
    K accuracy (the runs': their mean)."""
    methods = {**bank.yardsticks,
               **{m: bank.runs[:, j].mean(0) for j, m in enumerate(RUN_METHODS)}}
    k_right = {**bank.yardstick_k_right,
               **{m: bank.run_k_right[:, j].mean(0) for j, m in enumerate(COUNTING_RUN_METHODS)}}
    out = {}
    for index, label in enumerate(bank.bin_labels):
        members = (bank.snr_bin == index).nonzero().squeeze(1)
        if members.numel() < 2:
            continue
        picks = members[torch.randint(0, members.numel(), (resamples, members.numel()),
                                      generator=torch.Generator().manual_seed(index))]
        row: dict = {"sets": members.numel()}
        for name, errors in methods.items():
            row[name] = {}
            for floor, key in (("bayes", "excess_over_bayes"),
                               ("bayes_unknown_k", "excess_over_bayes_unknown_k")):
                bottom = bank.yardsticks[floor]
                row[name][key] = ratio_minus_one(errors[members], bottom[members]).item()
                row[name][f"{key}_se"] = ratio_minus_one(errors[picks], bottom[picks]).std().item()
            if name in k_right:
                row[name]["k_accuracy"] = k_right[name][members].mean().item()
        out[label] = row
    return out


def compare(yardsticks: dict[str, torch.Tensor], runs: torch.Tensor, names: list[str],
            group_size: int, resamples: int) -> dict:
    """Every method's MSE, excess over the floor and difference from tied EM, each with a
    bootstrap SE; each raw model's gap_closed and its paired difference from its group's first
    run."""
    sets = runs.shape[-1]
    picks = torch.randint(0, sets, (resamples, sets), generator=torch.Generator().manual_seed(0))
    references = {"bayes": "excess_over_bayes",
                  "bayes_unknown_k": "excess_over_bayes_unknown_k", "em_tied": "minus_em_tied"}

    def scores(errors: torch.Tensor) -> dict[str, float]:
        out = {"mse": errors.mean().item()}
        for reference, key in references.items():
            bottom = yardsticks[reference]
            out[key] = ratio_minus_one(errors, bottom).item()
            out[f"{key}_se"] = ratio_minus_one(errors[..., picks], bottom[picks]).std().item()
        return out

    report = {"yardsticks": {name: scores(errors) for name, errors in yardsticks.items()}}
    em, oracle = yardsticks["em"], yardsticks["oracle"]
    gaps = gap_closed(runs[:, 0].mean(-1), em.mean(), oracle.mean())  # [runs]
    boots = gap_closed(runs[:, 0][:, picks].mean(-1), em[picks].mean(-1),
                       oracle[picks].mean(-1))  # [runs, resamples]
    rows = []
    for i, name in enumerate(names):
        row = {"run": name, **{method: scores(runs[i, j]) for j, method in
                               enumerate(RUN_METHODS)},
               "gap_closed": gaps[i].item(), "gap_closed_se": boots[i].std().item()}
        ref = i - i % group_size
        if i != ref:
            row["reference"] = names[ref]
            row["minus_reference"] = (gaps[i] - gaps[ref]).item()
            row["minus_reference_se"] = (boots[i] - boots[ref]).std().item()
        rows.append(row)
    report["runs"] = rows
    # The runs' mean, each set's error averaged over the runs first (seed-to-seed spread is
    # then part of the estimate, not of its SE).
    report["mean_over_runs"] = {method: scores(runs[:, j].mean(0))
                                for j, method in enumerate(RUN_METHODS)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="finished runs (their final/ models); the first is the reference")
    parser.add_argument("--group-size", type=int, metavar="G",
                        help="compare each run's gap_closed with the first of its group of G "
                             "runs (default: all runs are one group)")
    parser.add_argument("--num-sets", type=int, default=2048, help="sets in the shared bank")
    parser.add_argument("--seed", type=int, default=777, help="seed of the shared bank")
    parser.add_argument("--data-preset", default="simple", help="prior of the bank")
    parser.add_argument("--refine", type=int, default=20, metavar="ITERATIONS",
                        help="EM iterations at most of the refined methods")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the JSON report to FILE (the tables still print)")
    args = parser.parse_args()
    if args.num_sets < 2 or args.bootstrap < 2 or args.refine < 1:
        parser.exit(EXIT_USAGE, "error: --num-sets and --bootstrap must be >= 2, --refine "
                                ">= 1\n")
    group_size = len(args.runs) if args.group_size is None else args.group_size
    if group_size < 1 or len(args.runs) % group_size:
        parser.exit(EXIT_USAGE, f"error: --group-size {group_size} must be >= 1 and divide the "
                                f"number of runs ({len(args.runs)})\n")
    try:
        saved, models = load_runs(args.runs)
        bank = per_set_errors(saved, models, args.data_preset, args.num_sets, args.seed,
                              args.refine)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"error: {error}\n")
    names = [str(run) for run in args.runs]
    report = {
        "benchmark": "compare", "date": date.today().isoformat(), "machine": machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data_preset": args.data_preset, "sets": args.num_sets, "seed": args.seed,
        "stream": COMPARISON_STREAM, "bootstrap": args.bootstrap,
        "refine_iterations": args.refine, "group_size": group_size,
        **compare(bank.yardsticks, bank.runs, names, group_size, args.bootstrap),
        "by_snr": by_snr(bank, args.bootstrap),
    }
    if args.save is not None:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return

    def line(label: str, s: dict[str, float]) -> str:
        return (f"  {label:<15} MSE {s['mse']:.7f}  over the floor "
                f"{100 * s['excess_over_bayes']:+5.1f} ± {100 * s['excess_over_bayes_se']:.1f} %"
                f"  not told K {100 * s['excess_over_bayes_unknown_k']:+5.1f} ± "
                f"{100 * s['excess_over_bayes_unknown_k_se']:.1f} %"
                f"  vs em_tied {100 * s['minus_em_tied']:+5.1f} ± "
                f"{100 * s['minus_em_tied_se']:.1f} %")

    print(f"{args.num_sets} sets of {args.data_preset} (seed {args.seed}), refined by up to "
          f"{args.refine} EM iterations")
    for name, s in report["yardsticks"].items():
        print(line(name, s))
    for row in report["runs"]:
        diff = ("" if "reference" not in row else
                f"; minus {row['reference']}: {row['minus_reference']:+.4f} ± "
                f"{row['minus_reference_se']:.4f}")
        print(f"{row['run']}: gap_closed {row['gap_closed']:+.4f} ± "
              f"{row['gap_closed_se']:.4f}{diff}")
        for method in RUN_METHODS:
            print(line(method, row[method]))
    if len(report["runs"]) > 1:
        print(f"mean over the {len(report['runs'])} runs:")
        for method in RUN_METHODS:
            print(line(method, report["mean_over_runs"][method]))
    shown = ("model", "refined", "refined_told_k", "em_tied", "em_bic", "bayes_unknown_k")
    for key, title in (("excess_over_bayes", "over the floor told K"),
                       ("excess_over_bayes_unknown_k", "over the floor not told K")):
        print(f"by SNR bin, {title} (%, runs: their mean):")
        print("| SNR bin | sets | " + " | ".join(shown) + " |")
        print("|---" * (len(shown) + 2) + "|")
        for label, row in report["by_snr"].items():
            print(f"| {label} | {row['sets']} | " + " | ".join(
                f"{100 * row[m][key]:+.1f} ± {100 * row[m][key + '_se']:.1f}" for m in shown)
                + " |")
    counting = (*COUNTING_RUN_METHODS, *COUNTING_YARDSTICKS)
    print("by SNR bin, K right (runs: their mean):")
    print("| SNR bin | " + " | ".join(counting) + " |")
    print("|---" * (len(counting) + 1) + "|")
    for label, row in report["by_snr"].items():
        print(f"| {label} | " + " | ".join(f"{row[m]['k_accuracy']:.3f}" for m in counting)
              + " |")


if __name__ == "__main__":
    main()
