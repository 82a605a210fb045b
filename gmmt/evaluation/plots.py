"""Figures of a model's behaviour: example sets, training curves, error versus SNR (PNG files).

Every figure is a ``Figure`` with its own Agg canvas: no pyplot state, no display and no change
to the caller's global backend (a notebook that imports this keeps its own), so plots can be made
from a training job, a test or a headless server. File names
are fixed (:data:`PLOT_FILES`) so a run folder always holds the same set of names.

Shape legend: ``b`` sets, ``n`` points, ``d`` dimensions.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gmmt.data.batch import GMMBatch
from gmmt.evaluation.metrics import centre_mse_per_set
from gmmt.evaluation.results import MODEL, Scores, bin_edges, bin_sort_key

PLOT_FILES = {
    "sample_grid": "sample_grid.png",
    "training_curves": "training_curves.png",
    "error_vs_snr": "error_vs_snr.png",
}
# One colour per baseline in every figure, so a legend read once holds for all of them.
BASELINE_COLOURS = {"identity": "tab:gray", "oracle": "tab:green", "bayes": "tab:red",
                    "em_tied": "tab:purple", "em": "tab:blue", "em_bic": "tab:cyan",
                    "kmeans": "tab:orange", "refined": "tab:brown", "refined_told_k": "tab:olive",
                    "bayes_unknown_k": "tab:pink"}
# Legend names that say what a yardstick knows.
LEGEND_NAMES = {"oracle": "oracle (knows the parameters)", "bayes": "bayes (the floor)",
                "bayes_unknown_k": "bayes not told K (its floor)",
                "em_bic": "em_bic (chooses K)", "refined": "model + EM (its own K, blended)",
                "refined_told_k": "model + EM (told K)"}
DPI = 110
FONT = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9}

def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # render with Agg whatever the process-wide backend is
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _colours(k_max: int) -> list:
    """One colour per component; tab10 while it suffices, tab20 for up to 20 clusters."""
    cmap = matplotlib.colormaps["tab10" if k_max <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(k_max, 1))]


def _baseline_colour(name: str, index: int) -> str:
    return BASELINE_COLOURS.get(name, f"C{4 + index}")


def _baseline_order(names: set[str]) -> list[str]:
    known = [n for n in BASELINE_COLOURS if n in names]
    return known + sorted(names - set(known))


def _xy(values: torch.Tensor) -> tuple[list[float], list[float]]:
    """The first two coordinates of [n, d] values (1-D data is drawn on the line y = 0)."""
    x = values[:, 0].tolist()
    y = values[:, 1].tolist() if values.shape[1] > 1 else [0.0] * len(x)
    return x, y


# --- sample grid ---------------------------------------------------------------------------


def plot_sample_grid(batch: GMMBatch, predictions: Mapping[str, torch.Tensor],
                     path: str | Path, num_examples: int = 6) -> Path:
    """Example sets with the true structure and each method's output; returns ``path``.

    One row per method (in the order of ``predictions``, e.g. ``{"model": ..., "kmeans": ...}``),
    one column per set (the first ``num_examples`` sets of ``batch``). Every panel shows the
    observed points coloured by their true cluster, the true centres (black X) and the method's
    predicted centre for every point (dots with a dark edge, in the colour of the point's true
    cluster, so a prediction that lands on the wrong centre shows as an off-colour dot there).
    Panels are titled with K, the SNR and that method's MSE / sigma^2 on the set; a column shares
    its axis limits so rows compare directly. Only the first two coordinates are drawn.

    Args:
        batch: the sets (any device; ragged sets are drawn without their padding).
        predictions: method name -> predicted centres [b, n, d] for ``batch``.
        path: PNG file to write (folders are created).
        num_examples: how many sets to show (fewer if the batch is smaller).
    """
    if not predictions:
        raise ValueError("plot_sample_grid needs at least one method's predictions")
    cols = min(num_examples, batch.num_sets)
    if cols < 1:
        raise ValueError(f"nothing to draw: num_examples={num_examples}, "
                         f"batch has {batch.num_sets} sets")
    batch = batch.slice(0, cols).to("cpu")
    preds = {}
    for name, pred in predictions.items():
        if pred.shape[1:] != batch.points.shape[1:] or pred.shape[0] < cols:
            raise ValueError(f"predictions[{name!r}] has shape {tuple(pred.shape)}; expected "
                             f"[>= {cols}, {batch.points.shape[1]}, {batch.points.shape[2]}]")
        preds[name] = pred[:cols].detach().to("cpu", torch.float64)
    target = batch.target.double()
    sigma2 = batch.sigma.double().square()
    scores = {name: centre_mse_per_set(p, target, batch.mask) / sigma2
              for name, p in preds.items()}
    colours = _colours(batch.centres.shape[1])

    with matplotlib.rc_context(FONT):
        fig = Figure(figsize=(3.1 * cols, 3.3 * len(preds) + 0.5), layout="constrained")
        axes = fig.subplots(len(preds), cols, squeeze=False)
        for j in range(cols):
            real = slice(None) if batch.mask is None else batch.mask[j]
            points = batch.points[j][real].double()
            labels = batch.labels[j][real].tolist()
            point_colours = [colours[z] for z in labels]
            centres = batch.centres[j, : int(batch.k[j])].double()
            # A square window around the observed points and true centres, shared down the
            # column: equal scales on both axes keep isotropic noise looking round.
            both = torch.cat([points, centres])
            lo, hi = both.min(0).values, both.max(0).values
            mid = (lo + hi) / 2
            half = 0.53 * float((hi - lo).max().clamp_min(1e-6))
            for i, (name, pred) in enumerate(preds.items()):
                ax: Axes = axes[i, j]
                ax.scatter(*_xy(points), s=6, c=point_colours, alpha=0.3, linewidths=0,
                           rasterized=True)
                ax.scatter(*_xy(pred[j][real]), s=14, c=point_colours, edgecolors="0.15",
                           linewidths=0.4, alpha=0.85, zorder=3, rasterized=True)
                ax.scatter(*_xy(centres), s=110, marker="X", c="black", edgecolors="white",
                           linewidths=0.8, zorder=4)
                ax.set_xlim(float(mid[0]) - half, float(mid[0]) + half)
                if points.shape[1] > 1:
                    ax.set_ylim(float(mid[1]) - half, float(mid[1]) + half)
                    ax.set_aspect("equal")
                ax.set_title(f"{name}: K={int(batch.k[j])}, SNR {float(batch.snr_db[j]):.1f} dB"
                             f"\nMSE/σ² = {float(scores[name][j]):.3g}")
                ax.tick_params(labelsize=8)
                if j == 0:
                    ax.set_ylabel(f"{name}\n$x_2$" if points.shape[1] > 1 else name)
                if i == len(preds) - 1:
                    ax.set_xlabel("$x_1$")
        handles = [
            Line2D([], [], ls="", marker="o", ms=4, mfc="tab:blue", mec="none", alpha=0.5,
                   label="observed point (colour = true cluster)"),
            Line2D([], [], ls="", marker="o", ms=5, mfc="tab:blue", mec="0.15", mew=0.5,
                   label="predicted centre of the point"),
            Line2D([], [], ls="", marker="X", ms=10, mfc="black", mec="white",
                   label="true centre"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
        fig.suptitle("Example sets: " + " vs ".join(preds), fontsize=12)
        return _save(fig, path)


# --- training curves -----------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice (a resumed run appends
    to metrics.jsonl) keeps its last value. Non-finite values are logged as strings."""
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row:
            by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def curriculum_end(rows: list[dict]) -> int | None:
    """The last step logged with ``train/curriculum`` = 1 (smaller training sets), if any."""
    steps = [step for step, flag in zip(*_series(rows, "train/curriculum"), strict=True)
             if flag == 1.0]
    return max(steps) if steps else None


def _log_if_positive(ax: Axes, values: list[float]) -> None:
    # Some loss normalisations (e.g. "log") go negative; a log axis would drop those points.
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


def plot_training_curves(metrics_jsonl_path: str | Path, path: str | Path) -> Path:
    """Training loss and validation MSE against the optimizer step; returns ``path``.

    Left: ``train/loss`` (log y when positive), the steps of a ``training.curriculum`` shaded
    on both sides. Right: ``val/mse`` (``val/mse_over_noise`` when
    MSE was not logged) with every baseline logged under ``val/baselines.<name>.<same metric>``
    as a dashed horizontal line at its last value (baselines do not train).

    Args:
        metrics_jsonl_path: a run's ``metrics.jsonl`` (one JSON record per line with ``step``).
        path: PNG file to write.
    """
    rows = _read_jsonl(Path(metrics_jsonl_path))
    with matplotlib.rc_context(FONT):
        fig = Figure(figsize=(11, 4), layout="constrained")
        ax_train, ax_val = fig.subplots(1, 2)

        steps, loss = _series(rows, "train/loss")
        if steps:
            ax_train.plot(steps, loss, color="tab:blue", lw=1.5,
                          marker="o" if len(steps) < 30 else None, ms=3)
            _log_if_positive(ax_train, loss)
        else:
            ax_train.text(0.5, 0.5, "no training loss logged", ha="center", va="center",
                          transform=ax_train.transAxes)
        end = curriculum_end(rows)
        if end is not None:  # the loss jumps where the set sizes change; say why
            for ax in (ax_train, ax_val):
                ax.axvspan(0, end, color="0.9", zorder=0, label="curriculum (smaller sets)")
            ax_train.legend(loc="upper right")
        ax_train.set(title="Training loss", xlabel="step", ylabel="loss")
        ax_train.grid(True, which="both", alpha=0.3)

        metric = "mse_over_noise" if (not any("val/mse" in r for r in rows) and any(
            "val/mse_over_noise" in r for r in rows)) else "mse"
        label = {"mse": "MSE", "mse_over_noise": "MSE / σ²"}[metric]
        steps, values = _series(rows, f"val/{metric}")
        plotted = list(values)
        if steps:
            ax_val.plot(steps, values, color="black", lw=2, marker="o", ms=4, label="model")
        baselines = {k.split(".")[1] for r in rows for k in r
                     if k.startswith("val/baselines.") and k.endswith(f".{metric}")
                     and k.count(".") == 2}
        for i, name in enumerate(_baseline_order(baselines)):
            _, last = _series(rows, f"val/baselines.{name}.{metric}")
            ax_val.axhline(last[-1], ls="--", lw=1.3, color=_baseline_colour(name, i),
                           label=name)
            plotted.append(last[-1])
        if plotted:
            _log_if_positive(ax_val, plotted)
            ax_val.legend(loc="best")
        else:
            ax_val.text(0.5, 0.5, "no validation logged", ha="center", va="center",
                        transform=ax_val.transAxes)
            ax_val.set(xticks=[], yticks=[])
        # Only announce dashed baselines when some were drawn.
        note = " (baselines dashed)" if baselines else ""
        ax_val.set(title=f"Validation {label}{note}", xlabel="step", ylabel=label)
        ax_val.grid(True, which="both", alpha=0.3)
        return _save(fig, path)


# --- error versus SNR ----------------------------------------------------------------------


def snr_breakdown(by_snr: Mapping[str, Scores], metric: str
                  ) -> tuple[list[str], dict[str, list[float]]]:
    """Bin labels (by increasing SNR) and, per method (``"model"``, then the baselines),
    the value of ``metric`` in every bin (NaN where a bin lacks it).

    Args:
        by_snr: bin label -> method -> metric -> value (``Results.breakdowns["by_snr"]``).
    """
    labels = sorted(by_snr, key=bin_sort_key)
    found = {m for scores in by_snr.values() for m, values in scores.items() if metric in values}
    methods = ([MODEL] if MODEL in found else []) + _baseline_order(found - {MODEL})
    return labels, {m: [by_snr[b].get(m, {}).get(metric, math.nan) for b in labels]
                    for m in methods}


def plot_error_vs_snr(by_snr: Mapping[str, Scores], path: str | Path,
                      overall: Scores | None = None) -> Path:
    """MSE / sigma^2 (MSE when that was not computed) per SNR bin for the model and every
    baseline, the Bayes floor drawn solid; returns ``path``.

    Args:
        by_snr: bin label -> method -> metric -> value (``Results.breakdowns["by_snr"]``).
        overall: the overall scores; the model's gaps from them go in the title.

    Raises:
        ValueError: ``by_snr`` is empty (enable ``validation.breakdown.by_snr``).
    """
    metric = "mse_over_noise" if any("mse_over_noise" in values for scores in by_snr.values()
                                     for values in scores.values()) else "mse"
    labels, series = snr_breakdown(by_snr, metric)
    if not labels:
        raise ValueError("no per-SNR scores to plot; enable validation.breakdown.by_snr")
    positions = [bin_edges(b) for b in labels]
    numeric = all(p is not None for p in positions)
    x = [(p[0] + p[1]) / 2 for p in positions] if numeric else list(range(len(labels)))
    ylabel = {"mse": "MSE per coordinate", "mse_over_noise": "MSE / σ²"}[metric]

    _, excess = snr_breakdown(by_snr, "excess_over_bayes")
    excess = {m: [100 * v for v in vs] for m, vs in excess.items() if m != "identity"}

    def draw(ax: Axes, lines: dict[str, list[float]]) -> None:
        for i, (method, values) in enumerate(lines.items()):
            is_model = method == MODEL
            ax.plot(x, values, label=LEGEND_NAMES.get(method, method), marker="o",
                    ms=6 if is_model else 4, lw=2.5 if is_model else 1.4,
                    ls="-" if method in (MODEL, "bayes") else "--",
                    color="black" if is_model else _baseline_colour(method, i),
                    zorder=3 if is_model else 2)
        if numeric:
            for edge in sorted({e for p in positions for e in p}):  # what each point averages
                ax.axvline(edge, color="0.85", lw=0.8, zorder=0)
        else:
            ax.set_xticks(x, labels)
        ax.grid(True, which="both", axis="y", alpha=0.3)

    with matplotlib.rc_context(FONT):
        # With the Bayes floor scored, a second panel shows every method relative to it: on
        # the first, identity's error squeezes the close yardsticks into one line.
        fig = Figure(figsize=(7.5, 7 if excess else 4.5), layout="constrained")
        axes = fig.subplots(2 if excess else 1, 1, sharex=True, squeeze=False)[:, 0]
        ax = axes[0]
        draw(ax, series)
        values = [v for vs in series.values() for v in vs if math.isfinite(v)]
        if values and min(values) > 0:
            ax.set_yscale("log")
        title = f"{ylabel} versus SNR"
        model = (overall or {}).get(MODEL, {})
        gaps = ([f"{100 * model['excess_over_bayes']:+.1f} % over the floor"]
                if "excess_over_bayes" in model else [])
        gaps += [f"reachable gap {model['reachable_gap']:+.3g}"] if "reachable_gap" in model \
            else []
        if gaps:
            title += "\nmodel overall: " + ", ".join(gaps)
        ax.set(title=title, ylabel=ylabel)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never over data
        if excess:
            low = axes[1]
            draw(low, {"bayes": [0.0] * len(labels)} | excess)
            low.set(ylabel="MSE over the Bayes floor (%)",
                    title="relative to the floor (0 %): the room any method can still close")
        axes[-1].set_xlabel("SNR (dB), bin centres; grey lines = bin edges" if numeric
                            else "SNR bin")
        return _save(fig, path)
