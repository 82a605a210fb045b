"""The configured plots of a trained model, drawn in one call (by the trainer and gmmt.evaluate).

Kept apart from :mod:`gmmt.evaluation.plots` (which only draws what it is given) because this is
where predictions are computed: the model's and one baseline's on the sample-grid sets.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        out[name] = run_baseline(name, batch, config.em, generator).centres
    return out


BREAKDOWNS = ("by_snr", "by_k", "by_sep")


def _split_group(metrics: Mapping[str, float]) -> dict[str, Any]:
    """Flat keys of one group -> ``{"model": {...}, "baselines": {name: {...}}}``."""
    model: dict[str, float] = {}
    baselines: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("baselines."):
            _, name, metric = key.split(".", 2)
            baselines.setdefault(name, {})[metric] = value
        else:
            model[key] = value
    return {"model": model, "baselines": baselines}


def sections(metrics: Mapping[str, float]) -> dict[str, Any]:
    """Flat validation metrics -> the summary.json layout::

        {"model": {...}, "baselines": {name: {...}},
         "by_snr": {"<lo>_<hi>": {"model": {...}, "baselines": {...}}}, "by_k": {...}}

    (breakdown sections only when present). :func:`flatten_sections` inverts it.
    """
    overall: dict[str, float] = {}
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        kind = key.split(".", 1)[0]
        if kind in BREAKDOWNS:
            # Bin labels may contain dots ("5.8_8.6"): the label ends where the metric begins.
            rest = key[len(kind) + 1:]
            label, metric = _split_breakdown_key(rest)
            groups.setdefault(kind, {}).setdefault(label, {})[metric] = value
        else:
            overall[key] = value
    out = _split_group(overall)
    for kind, labelled in groups.items():
        out[kind] = {label: _split_group(flat) for label, flat in labelled.items()}
    return out


def _split_breakdown_key(rest: str) -> tuple[str, str]:
    """``"5.8_8.6.baselines.em.mse"`` -> (``"5.8_8.6"``, ``"baselines.em.mse"``)."""
    if ".baselines." in rest:
        label, _, tail = rest.partition(".baselines.")
        return label, "baselines." + tail
    label, _, metric = rest.rpartition(".")
    return label, metric


def flatten_sections(sections_: Mapping[str, Any]) -> dict[str, float]:
    """The summary.json layout of :func:`sections` back to flat validation keys (``mse``,
    ``by_snr.<bin>.mse``, ``baselines.<name>.mse``, ...)."""

    def flat_group(group: Mapping[str, Any], prefix: str) -> dict[str, float]:
        out = {prefix + k: v for k, v in group.get("model", {}).items()}
        for name, values in group.get("baselines", {}).items():
            out.update({f"{prefix}baselines.{name}.{m}": v for m, v in values.items()})
        return out

    flat = flat_group(sections_, "")
    for kind in BREAKDOWNS:
        for label, group in sections_.get(kind, {}).items():
            flat.update(flat_group(group, f"{kind}.{label}."))
    return flat


def draw_plots(config: ValidationConfig, out_dir: str | Path, model: nn.Module,
               batch: GMMBatch, metrics: Mapping[str, float],
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
        metrics: flat validation metrics (``by_snr.*`` keys feed ``error_vs_snr``).
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
                if not any(k.startswith("by_snr.") for k in metrics):
                    log.warning("plot error_vs_snr skipped: no per-SNR metrics (set "
                                "validation.breakdown.by_snr=true)")
                    continue
                drawn[name] = plot_error_vs_snr(metrics, path)
        except Exception:  # a broken plot must not fail a finished run; keep the traceback
            log.warning("plot %s failed", name, exc_info=True)
    return drawn
