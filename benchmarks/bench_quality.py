"""Quality of a CPU-trainable model, raw and refined, against every yardstick.

Trains the ``cpu_reference`` experiment preset (``--preset`` another, e.g. ``cpu_wide``; or
takes a finished run with ``--run``), then
scores its final model as ``gmmt.evaluate`` does on held-out sets of the ``simple`` prior (a data
stream never used in training or validation): overall, per SNR bin, per K and per separation,
and on sets of one fixed size each (``--set-sizes``, half as many sets). ``cpu_reference``
trains on ``simple`` too, most of its steps on smaller sets (``training.curriculum``: cheaper
steps), and is scored on the prior's full 100-500 points; ``--data-preset`` scores on another
prior.

The model is scored three ways: raw (its predictions), ``refined`` (tied EM from its clusters
with its own K: not told K) and ``refined_told_k`` (told the true K), ``--refine`` iterations
at most. With a count head, its calibration per SNR bin and K: the mean probability it gives its
answer against how often that answer is right, and the mean probability of the true K.

The question it answers: how far is the model, which is told nothing but the points, above the
Bayes floor (the best any method told K and sigma can do) and above the floor not told K
(``bayes_unknown_k``: told sigma, averaged over the posterior over K), and does it beat the
strongest classical method, tied-variance EM told the true K (``reachable_gap > 0``)? The
oracle (which knows the true parameters) and ``gap_closed`` against it are kept for comparison
with past runs. K accuracy: the model's (its count head's, else its own grouping of its predictions)
against EM choosing K by BIC and the floor's most probable K (the best count from the points).

Usage: ``python benchmarks/bench_quality.py [--run RUN_DIR | --preset NAME --set KEY=VALUE ...]
[--num-sets 2048] [--data-preset simple] [--set-sizes 100 500] [--refine 20] [--json]
[--save FILE]``
"""

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import attrs
import torch
from common import DefaultsHelpFormatter, machine

from gmmt import load_model
from gmmt.config.converter import check
from gmmt.config.data import DistributionSpec
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.presets import resolve_config
from gmmt.config.validation import EMConfig
from gmmt.data.gmm import GMMSampler
from gmmt.evaluation.held_out import (
    EVALUATION_STREAM,
    evaluate_saved_model,
    evaluation_config,
    preset_data,
    score_held_out,
)
from gmmt.evaluation.metrics import k_values, snr_bin_index, snr_bin_labels, snr_bins
from gmmt.evaluation.refine import has_count_head, run_model
from gmmt.evaluation.results import Results, Scores
from gmmt.training.experiment import ExperimentManager

METHODS = ("model", "refined", "refined_told_k", "oracle", "bayes", "bayes_unknown_k", "em_tied",
           "em", "em_bic", "kmeans", "identity")
BASELINES = METHODS[3:]
# The methods that choose K, scored also against the floor not told K.
NOT_TOLD_K = ("model", "refined", "em_bic")


def train(preset: str, base_dir: Path, overrides: list[str]) -> tuple[Path, float]:
    config = resolve_config(preset, overrides=[
        f"paths.base_dir={base_dir}", "logging.progress_bar=false", *overrides]).config
    start = time.time()
    summary = ExperimentManager(config).run()
    return Path(summary["run_dir"]), time.time() - start


def evaluate(run_dir: Path, num_sets: int, data_preset: str, iterations: int) -> Results:
    """Every baseline and breakdown, and the refined model, on the held-out bank (also written
    to the run's evaluation/ folder, as ``gmmt.evaluate`` writes it)."""
    result, _ = evaluate_saved_model(run_dir, data_preset=data_preset, num_sets=num_sets,
                                     baselines=BASELINES, device="cpu", progress=False,
                                     refine_iterations=iterations)
    return Results.from_json(result)


def count_calibration(saved: ExperimentConfig, model: torch.nn.Module, data_preset: str,
                      num_sets: int) -> dict | None:
    """The count head on the held-out bank (the sets gmmt.evaluate draws), per SNR bin and K:
    share of sets whose most probable K is right, the mean probability of that K (calibrated:
    the two agree) and the mean probability of the true K. None without a count head."""
    if not has_count_head(model):
        return None
    data = preset_data(data_preset)
    sampler = GMMSampler(data, saved.device.seed)
    edges = snr_bins(data.snr_db_params, saved.validation.breakdown.snr_bins)
    labels, ks = snr_bin_labels(edges), k_values(data.cluster_params)
    rows: dict[str, list[torch.Tensor]] = {"right": [], "confidence": [], "true_k": [],
                                           "snr_bin": [], "k": []}
    for i, start in enumerate(range(0, num_sets, 32)):
        batch = sampler.batch(i, min(32, num_sets - start), rank=0, stream=EVALUATION_STREAM)
        with torch.no_grad():
            probs = run_model(model, batch.points, batch.mask)[1]
        confidence, best = probs.max(-1)
        rows["right"].append((best + 1 == batch.k).double())
        rows["confidence"].append(confidence.double())
        # a prior with a larger K_max than the model's: the head gives such K probability 0
        index = (batch.k - 1).clamp_max(probs.shape[1] - 1).unsqueeze(1)
        true_k = probs.gather(1, index).squeeze(1).double()
        rows["true_k"].append(torch.where(batch.k <= probs.shape[1], true_k, 0.0))
        rows["snr_bin"].append(snr_bin_index(batch.snr_db, edges))
        rows["k"].append(batch.k)
    cat = {key: torch.cat(value) for key, value in rows.items()}

    def summary(members: torch.Tensor) -> dict[str, float]:
        return {key: cat[key][members].mean().item() for key in ("right", "confidence",
                                                                 "true_k")} | {
            "sets": int(members.sum())}

    return {"overall": summary(torch.ones_like(cat["k"], dtype=torch.bool)),
            "by_snr": {label: summary(cat["snr_bin"] == j) for j, label in enumerate(labels)},
            "by_k": {str(k): summary(cat["k"] == k) for k in ks}}


def load_run(run_dir: Path) -> tuple[ExperimentConfig, torch.nn.Module]:
    """The saved config and the final model of a finished run."""
    return ExperimentConfig.load(run_dir / "final" / "config.json"), load_model(run_dir / "final")


def single_start_em(saved: ExperimentConfig, model: torch.nn.Module, num_sets: int,
                    data_preset: str) -> dict[str, float]:
    """EM with ONE k-means++ start (n_init=1) on the same held-out sets, for comparison with
    the configured EM (n_init restarts, the best likelihood kept)."""
    em = EMConfig(n_init=1, max_iter=saved.validation.em.max_iter, tol=saved.validation.em.tol)
    config = evaluation_config(saved, num_sets, 32, ["em", "oracle"])
    config.em = em
    results, _ = score_held_out(model, preset_data(data_preset), config, saved.device.seed,
                                torch.device("cpu"), progress=False)
    return {"mse": results.overall["em"]["mse"],
            "mse_over_noise": results.overall["em"]["mse_over_noise"],
            "gap_closed": results.model.get("gap_closed")}


def by_set_size(saved: ExperimentConfig, model: torch.nn.Module, data_preset: str,
                sizes: list[int], num_sets: int) -> dict[str, dict[str, float]]:
    """Model, tied and untied EM (the run's restarts) and oracle MSE on the prior with N fixed at
    each size.

    EM's excess over the oracle shrinks roughly as 1/N (a sample mean gets better with more
    points); comparing the model at a small and a large N shows whether its own averaging
    keeps up.
    """
    config = evaluation_config(saved, num_sets, 32, ["em_tied", "em", "oracle"])
    data = preset_data(data_preset)
    rows = {}
    for size in sizes:
        fixed = attrs.evolve(data, sample_count_distribution=DistributionSpec(type="fixed",
                                                                               value=size))
        check(fixed)  # the cross-field rules: e.g. a size below 1 is refused here
        results, _ = score_held_out(model, fixed, config, saved.device.seed,
                                    torch.device("cpu"), progress=False)
        overall = results.overall
        rows[str(size)] = {"model": overall["model"]["mse"], "em": overall["em"]["mse"],
                           "em_tied": overall["em_tied"]["mse"],
                           "oracle": overall["oracle"]["mse"],
                           "gap_closed": results.model.get("gap_closed")}
    return rows


def column(scores: Scores, metric: str) -> dict[str, float | None]:
    """``metric`` of every method of METHODS in one group (None where it was not scored)."""
    return {m: scores.get(m, {}).get(metric) for m in METHODS}


def by_separation(results: Results) -> dict:
    """Raw MSE per closest-centre separation bin, with the bin's set count and its contribution
    to the overall MSE difference model - EM (sets / all sets x the bin's difference; the
    contributions sum to the overall difference, whose sign decides gap_closed's)."""
    counts = results.counts.get("by_sep", {})
    rows = {label: {**column(scores, "mse"), "sets": counts.get(label, 0)}
            for label, scores in results.breakdowns.get("by_sep", {}).items()}
    total_sets = sum(row["sets"] for row in rows.values())
    for row in rows.values():
        if row["model"] is not None and row["em"] is not None and total_sets:
            row["contribution_to_model_minus_em"] = (row["sets"] / total_sets
                                                     * (row["model"] - row["em"]))
    return rows


# The methods of the per-bin tables printed (the JSON holds every method).
BIN_METHODS = ("model", "refined", "refined_told_k", "em_tied", "em_bic", "em")
MODEL_KEYS = ("excess_over_bayes", "reachable_gap", "gap_closed", "k_accuracy")


def over_unknown_k_floor(scores: Scores) -> dict[str, float | None]:
    """MSE / MSE_bayes_unknown_k - 1 of each method that chooses K (NOT_TOLD_K), in one group."""
    floor = scores.get("bayes_unknown_k", {}).get("mse")
    return {f"{m}_excess_over_bayes_unknown_k":
            None if not floor or scores.get(m, {}).get("mse") is None
            else scores[m]["mse"] / floor - 1 for m in NOT_TOLD_K}


def by_bin(results: Results, kind: str) -> dict:
    """MSE / sigma^2 and excess over the floor of every method (and over the floor not told K of
    those that choose K), the model's gaps, and the K accuracy of each method that chooses K,
    in each bin of a breakdown."""
    return {label: column(scores, "mse_over_noise")
            | {key: scores["model"].get(key) for key in MODEL_KEYS}
            | {f"{m}_excess_over_bayes": scores.get(m, {}).get("excess_over_bayes")
               for m in METHODS if m != "bayes"}
            | over_unknown_k_floor(scores)
            | {f"{m}_k_accuracy": scores.get(m, {}).get("k_accuracy")
               for m in ("refined", "em_bic", "bayes_unknown_k")}
            for label, scores in results.breakdowns.get(kind, {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run to score")
    parser.add_argument("--preset", default="cpu_reference",
                        help="experiment preset a new run trains")
    parser.add_argument("--base-dir", type=Path, default=Path("runs"),
                        help="where a new training run goes (default: runs/)")
    parser.add_argument("--num-sets", type=int, default=2048, help="held-out sets")
    parser.add_argument("--data-preset", default="simple",
                        help="prior of the held-out sets (default: simple)")
    parser.add_argument("--set-sizes", type=int, nargs="*", default=[100, 500],
                        help="also score on the prior with N fixed at each size "
                             "(default: 100 500; none to skip)")
    parser.add_argument("--refine", type=int, default=20, metavar="ITERATIONS",
                        help="EM iterations at most of the refined methods")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override the trained preset, as gmmt.run --set (repeatable; "
                             "e.g. device.seed=43 for a seed repeat)")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--save", type=Path, metavar="FILE",
                        help="also write the JSON report to FILE (the tables still print)")
    args = parser.parse_args()
    if args.run is not None and args.overrides:
        parser.error("--set changes a new training run; it cannot apply to --run")
    train_s = None
    run_dir = args.run
    if run_dir is None:
        run_dir, train_s = train(args.preset, args.base_dir, args.overrides)
    result = evaluate(run_dir, args.num_sets, args.data_preset, args.refine)
    saved, model = load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    report = {
        "benchmark": "quality", "date": date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "run_dir": str(run_dir), "train_wall_s": None if train_s is None else round(train_s),
        "train_steps": summary["steps"], "parameters": summary["parameters"],
        "held_out_sets": args.num_sets, "held_out_prior": args.data_preset,
        "refine_iterations": args.refine,
        "overall": {m: result.overall.get(m, {}) for m in METHODS},
        "overall_over_bayes_unknown_k": over_unknown_k_floor(result.overall),
        **{key: result.model.get(key) for key in MODEL_KEYS},
        "bayes_unconverged_sets": round(result.overall.get("bayes", {}).get("unconverged", 0)
                                        * args.num_sets),
        "em_single_start": single_start_em(saved, model, args.num_sets, args.data_preset),
        "by_snr": by_bin(result, "by_snr"),
        "by_k": by_bin(result, "by_k"),
        "by_separation": by_separation(result),
        "by_set_size": by_set_size(saved, model, args.data_preset, args.set_sizes,
                                   args.num_sets // 2),
        "count_head": count_calibration(saved, model, args.data_preset, args.num_sets),
    }
    if args.save is not None:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    trained = "given with --run" if train_s is None else f"{report['train_wall_s']} s"
    print(f"run: {run_dir} ({report['train_steps']} steps, {trained})")
    print("| method | MSE | MSE/σ² | over the floor | ARI | K right |")
    print("|---|---|---|---|---|---|")
    nan = float("nan")

    def cell(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for m in METHODS:
        row = report["overall"][m]
        excess = row.get("excess_over_bayes")
        print(f"| {m} | {cell(row.get('mse'), '.6f')} | {cell(row.get('mse_over_noise'), '.4f')}"
              f" | {cell(None if excess is None else 100 * excess, '+.1f')} % | "
              f"{cell(row.get('ari'), '.4f')} | {cell(row.get('k_accuracy'), '.3f')} |")
    print(f"reachable gap {report['reachable_gap'] or nan:.3f} (tied EM 0, floor 1); gap_closed "
          f"{report['gap_closed'] or nan:.3f} (EM 0, oracle 1); against single-start EM: "
          f"{report['em_single_start']['gap_closed'] or nan:.3f}; the floor's chains disagree "
          f"on {report['bayes_unconverged_sets']} sets")
    print("not told K, over the floor not told K: " + ", ".join(
        f"{m} {cell(None if e is None else 100 * e, '+.1f')} %"
        for m, e in zip(NOT_TOLD_K, report["overall_over_bayes_unknown_k"].values())))
    for kind, heading in (("by_snr", "SNR bin"), ("by_k", "K")):
        print(f"| {heading} | " + " | ".join(f"{m} over the floor" for m in BIN_METHODS)
              + " | " + " | ".join(f"{m} over the floor not told K" for m in NOT_TOLD_K)
              + " | K right: model | em_bic | bayes_unknown_k |")
        print("|---" * (len(BIN_METHODS) + len(NOT_TOLD_K) + 4) + "|")
        for label, row in report[kind].items():
            excess = ([row.get(f"{m}_excess_over_bayes") for m in BIN_METHODS]
                      + [row.get(f"{m}_excess_over_bayes_unknown_k") for m in NOT_TOLD_K])
            print(f"| {label} | " + " | ".join(
                cell(None if e is None else 100 * e, "+.1f") for e in excess)
                + " | " + " | ".join(cell(row.get(key), ".3f") for key in (
                    "k_accuracy", "em_bic_k_accuracy", "bayes_unknown_k_k_accuracy")) + " |")
    if report["count_head"] is not None:
        head = report["count_head"]["overall"]
        print(f"count head: K right {head['right']:.3f}, mean probability of its K "
              f"{head['confidence']:.3f}, of the true K {head['true_k']:.3f}")
    for size, row in report["by_set_size"].items():
        print(f"N = {size}: model {row['model']:.6f}, tied EM {row['em_tied']:.6f}, EM "
              f"{row['em']:.6f}, oracle {row['oracle']:.6f}, gap_closed {row['gap_closed']:.3f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad --set or --set-sizes: one screen, no traceback
        print(f"bench_quality: {err}", file=sys.stderr)
        sys.exit(2)
