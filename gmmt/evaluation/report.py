"""Reports of a trained model: the configured plots in one call (by the trainer and
gmmt.evaluate), and the markdown tables of an evaluation.

Kept apart from :mod:`gmmt.evaluation.plots` (which only draws what it is given) because this is
where predictions are computed: the model's and one baseline's on the sample-grid sets.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gmmt.config.validation import ValidationConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import derive_seed, make_generator
from gmmt.evaluation.baselines import run_baseline
from gmmt.evaluation.plots import (
    PLOT_FILES,
    plot_error_vs_snr,
    plot_sample_grid,
    plot_training_curves,
)
from gmmt.evaluation.results import MODEL, Results, bin_sort_key

log = logging.getLogger("gmmt")

# Stream name for the baseline's random initialisation in the sample grid (see derive_seed).
PLOT_STREAM = "plots"


@torch.no_grad()
def grid_predictions(model: nn.Module, batch: GMMBatch, config: ValidationConfig,
                     seed: int) -> dict[str, torch.Tensor]:
    """Predicted centres [b, n, d] of the model and of ``config.visualization.baseline`` (when
    that baseline is evaluated) on ``batch``, in that order."""
    was_training = model.training
    model.eval()
    try:
        out = {"model": model(batch.points, batch.mask, batch.snr_db)}
    finally:
        model.train(was_training)
    name = config.visualization.baseline
    if name in config.baselines:
        generator = make_generator(derive_seed(seed, PLOT_STREAM, 0, 0), batch.points.device)
        out[name] = run_baseline(name, batch, config.em, generator, config.bayes).centres
    return out


def draw_plots(config: ValidationConfig, out_dir: str | Path, model: nn.Module,
               batch: GMMBatch, results: Results,
               metrics_jsonl: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Draw ``config.visualization.plots`` into ``out_dir``; returns plot name -> PNG path.

    A plot that cannot be drawn (no per-SNR metrics for ``error_vs_snr``, no metrics.jsonl for
    ``training_curves``, or any error while drawing) is skipped with a warning: plots come after
    a run's results are saved and must never cost them.

    Args:
        config: validation settings (which plots, grid size, which baseline, EM settings).
        out_dir: folder for the PNG files (created).
        model: the trained model, on ``batch``'s device.
        batch: sets for the sample grid (the first ``num_examples`` are drawn).
        results: the scores (their SNR breakdown feeds ``error_vs_snr``).
        metrics_jsonl: the run's metrics.jsonl, for ``training_curves``.
        seed: seeds the grid baseline's random initialisation.
    """
    out_dir = Path(out_dir)
    vis = config.visualization
    drawn: dict[str, Path] = {}
    for name in vis.plots:
        path = out_dir / PLOT_FILES[name]
        try:
            if name == "sample_grid":
                small = batch.slice(0, min(vis.num_examples, batch.num_sets))
                preds = grid_predictions(model, small, config, seed)
                drawn[name] = plot_sample_grid(small, preds, path, vis.num_examples)
            elif name == "training_curves":
                if metrics_jsonl is None or not Path(metrics_jsonl).is_file():
                    log.warning("plot training_curves skipped: no metrics.jsonl")
                    continue
                drawn[name] = plot_training_curves(metrics_jsonl, path)
            elif name == "error_vs_snr":
                if not results.breakdowns.get("by_snr"):
                    log.warning("plot error_vs_snr skipped: no per-SNR metrics (set "
                                "validation.breakdown.by_snr=true)")
                    continue
                drawn[name] = plot_error_vs_snr(results.breakdowns["by_snr"], path,
                                                results.overall)
        except Exception:  # a broken plot must not fail a finished run; keep the traceback
            log.warning("plot %s failed", name, exc_info=True)
    return drawn


# --- markdown ------------------------------------------------------------------------------

# What each method is told: a score means little without it.
KNOWS = {
    MODEL: "the points only",
    "refined": "the points only; EM from the model's clusters and K, blended with its answer",
    "refined_told_k": "K; EM from the model's clusters",
    "oracle": "true centres, weights, σ (unattainable)",
    "bayes": "K, σ and the prior (the floor)",
    "bayes_unknown_k": "σ and the prior (the floor not told K)",
    "em_tied": "K",
    "em": "K",
    "em_bic": "K ≤ K_max; chooses K",
    "kmeans": "K",
    "identity": "nothing",
}
SUMMARY_COLUMNS = (  # metric, heading
    ("mse", "MSE"), ("mse_over_noise", "MSE/σ²"), ("excess_over_bayes", "over the floor"),
    ("ari", "ARI"), ("nmi", "NMI"), ("k_accuracy", "K right"),
)
BREAKDOWN_TABLES = (  # kind, metric, heading of the bin column, title
    ("by_snr", "mse_over_noise", "SNR bin (dB)", "MSE/σ² by SNR"),
    ("by_snr", "excess_over_bayes", "SNR bin (dB)", "MSE over the Bayes floor by SNR"),
    ("by_snr", "k_accuracy", "SNR bin (dB)", "K found, by SNR"),
    ("by_k", "mse_over_noise", "K", "MSE/σ² by K"),
    ("by_k", "k_accuracy", "K", "K found, by K"),
    ("by_sep", "mse", "closest centres (σ)", "MSE by the distance between the two closest centres"),
)
MODEL_GAPS = (  # the model's derived gaps, shown under the summary and beside each breakdown
    ("reachable_gap", "reachable gap"), ("gap_closed", "gap closed"),
)


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{100 * value:+.1f} %" if percent else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def breakdown_table(results: Results, kind: str, metric: str, heading: str) -> list[str]:
    """Markdown rows of ``metric`` per bin of one breakdown, after the bin's number of sets,
    for every method that has it, then the model's gaps in that bin (nothing when the
    breakdown or the metric was not computed)."""
    bins = results.breakdowns.get(kind, {})
    labels = sorted(bins, key=bin_sort_key)
    methods = list(dict.fromkeys(m for label in labels for m, values in bins[label].items()
                                 if metric in values))
    if not labels or not methods:
        return []
    gaps = [(key, name) for key, name in MODEL_GAPS
            if metric == "mse_over_noise" and any(key in bins[b].get(MODEL, {}) for b in labels)]
    counts = results.counts.get(kind, {})
    percent = metric == "excess_over_bayes"
    rows = [[label, str(counts.get(label, "—"))]
            + [_fmt(bins[label].get(m, {}).get(metric), percent) for m in methods]
            + [_fmt(bins[label].get(MODEL, {}).get(key)) for key, _ in gaps] for label in labels]
    return _table([heading, "sets", *methods, *(f"model {name}" for _, name in gaps)], rows)


def markdown(results: Results, title: str, description: str) -> str:
    """The summary table (model + each baseline, with what each is told), the model's gaps,
    the floor's convergence, and the per-SNR / per-K / per-separation breakdowns, under
    ``## title`` and a one-line ``description``."""
    lines = [f"## {title}", "", description, ""]
    columns = [(m, h) for m, h in SUMMARY_COLUMNS
               if any(m in values for values in results.overall.values())]
    rows = [[method, KNOWS.get(method, ""),
             *(_fmt(values.get(m), m == "excess_over_bayes") for m, _ in columns)]
            for method, values in results.overall.items()]
    lines += _table(["", "is told", *(h for _, h in columns)], rows)
    notes = [f"model {name}: {_fmt(results.model[key])}" for key, name in MODEL_GAPS
             if key in results.model]
    if notes:
        lines += ["", "; ".join(notes) + " (reachable gap: from tied-variance EM (0) to the "
                  "Bayes floor (1); gap closed: from EM (0) to the unattainable oracle (1))."]
    for name, floor in (("bayes", "Bayes floor"), ("bayes_unknown_k", "Bayes floor not told K")):
        unconverged = results.overall.get(name, {}).get("unconverged")
        if unconverged is not None:
            lines += ["", f"{floor}: the Gibbs chains disagree on "
                      f"{round(unconverged * results.num_sets)} of {results.num_sets} sets."]
    for kind, metric, heading, table_title in BREAKDOWN_TABLES:
        table = breakdown_table(results, kind, metric, heading)
        if table:
            lines += ["", f"### {table_title}", "", *table]
    return "\n".join(lines) + "\n"
