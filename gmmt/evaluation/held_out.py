"""Scoring a saved model on a held-out bank: the library behind ``python -m gmmt.evaluate``.

The model and every baseline (identity, oracle, EM, k-means) are scored with every metric,
broken down by SNR bin, K and closest-centre separation, on a bank drawn from the run's own data
prior or from any data preset. :func:`evaluate_saved_model` writes ``evaluation.json``,
``evaluation.md`` (the markdown report) and plots.

The bank comes from its own data stream, ``"evaluation"`` (see ``gmmt.data.gmm.derive_seed``):
with the run's seed it shares no set with the training batches (stream ``"train"``) or with the
validation bank used for early stopping and best/ (stream ``"validation"``), so the scores are
not biased by model selection.
"""

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from tqdm.auto import tqdm

from gmmt.config.converter import check, structure, unstructure
from gmmt.config.data import DataConfig
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.model import RefinementConfig
from gmmt.config.presets import PresetStore, preset_dirs
from gmmt.config.validation import (
    DERIVED_METRICS,
    BaselineName,
    BreakdownConfig,
    MetricName,
    ValidationConfig,
    VisualizationConfig,
)
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler, derive_seed
from gmmt.evaluation.plots import PLOT_FILES
from gmmt.evaluation.report import draw_plots, markdown
from gmmt.evaluation.results import Results
from gmmt.evaluation.validate import layout, summarise, validation_sums
from gmmt.saved_model import CONFIG_FILE, MODEL_FILE, load_model, write_json_atomic

EVALUATION_STREAM = "evaluation"
ALL_METRICS: tuple[str, ...] = get_args(MetricName)
ALL_BASELINES: tuple[str, ...] = get_args(BaselineName)
# Scored unless asked otherwise: all but the floor not told K, which costs one Gibbs run per K
# the prior can draw (three times the floor's on simple).
DEFAULT_BASELINES: tuple[str, ...] = tuple(b for b in ALL_BASELINES if b != "bayes_unknown_k")
ALL_PLOTS = list(PLOT_FILES)
# What an evaluation without a data preset is filed under: the run's own data prior.
OWN_DATA = "training_data"
# Without a terminal (nohup, CI, a batch job) tqdm hides itself; a line is printed instead after
# the first batch, then at most every this many seconds, and after the last.
PROGRESS_EVERY_S = 30.0


class EvaluationError(Exception):
    """A usage mistake (bad path, preset or size), reported by the CLI as one line, exit 2."""


def find_model_folder(path: Path) -> Path:
    """The folder holding model.safetensors + config.json for a run, final/ or best/ path."""
    if not path.exists():
        raise EvaluationError(f"{path} does not exist")
    for folder in (path, path / "final"):
        if (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            return folder
    if (path / "checkpoints").is_dir():
        hint = f", or evaluate {path / 'best'}" if (path / "best" / MODEL_FILE).is_file() else ""
        raise EvaluationError(f"{path} has no final/ model (the run has not finished); "
                              f"finish it with python -m gmmt.run --resume {path}{hint}")
    raise EvaluationError(f"{path} holds no saved model: expected a run folder with final/, "
                          f"or a folder with {MODEL_FILE} and {CONFIG_FILE}")


def preset_data(name: str, config_dirs: Sequence[str] = ()) -> DataConfig:
    """The data config ``gmmt.run --data-preset NAME`` would train on (defaults + preset)."""
    store = PresetStore(preset_dirs(config_dirs))
    body = store.resolve_data_params({"data": store.resolve("data", name)})["data"]
    data = structure(body, DataConfig)
    check(data)
    return data


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible, else CPU) or a torch device name that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvaluationError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("device 'cuda' was requested but no CUDA GPU is visible")
    return device


def evaluation_config(saved: ExperimentConfig, num_sets: int, batch_size: int,
                      baselines: Sequence[str]) -> ValidationConfig:
    """Every metric, the chosen baselines, per-SNR, per-K and per-separation breakdown, all
    plots."""
    # A derived metric needs the baselines whose errors define it.
    metrics = [m for m in ALL_METRICS
               if set(DERIVED_METRICS.get(m, ())) <= set(baselines)]
    grid = saved.validation.visualization.baseline
    if grid not in baselines:  # the run's grid baseline, else the strongest one scored
        grid = next((b for b in ("em_tied", "bayes", "em", "em_bic", "kmeans", "oracle",
                                 "identity") if b in baselines), grid)
    plots = ALL_PLOTS if baselines else [p for p in ALL_PLOTS if p != "sample_grid"]
    config = ValidationConfig(
        num_sets=num_sets, batch_size=batch_size, every_n_steps=0, metrics=metrics,
        baselines=list(baselines), em=saved.validation.em, bayes=saved.validation.bayes,
        breakdown=BreakdownConfig(by_snr=True, snr_bins=saved.validation.breakdown.snr_bins,
                                  by_k=True, by_separation=True),
        visualization=VisualizationConfig(
            enabled=True, plots=plots, baseline=grid,
            num_examples=saved.validation.visualization.num_examples))
    check(config)
    return config


def score_held_out(model: torch.nn.Module, data: DataConfig, config: ValidationConfig,
                   seed: int, device: torch.device, progress: bool = True,
                   refinement: RefinementConfig | None = None) -> tuple[Results, GMMBatch]:
    """Scores of the model (and, with ``refinement`` enabled, the refined model) and the
    baselines on the held-out bank, and the bank's first batch.

    Batches are drawn one at a time (a large bank never sits in memory at once) from the
    ``"evaluation"`` stream; each batch's baselines get their own seed.
    """
    sampler = GMMSampler(data, seed, device)
    shape = layout(config, data, refinement is not None and refinement.enabled)
    totals = torch.zeros(shape.shape, dtype=torch.float64)
    starts = range(0, config.num_sets, config.batch_size)
    first = None
    # A bar on a terminal; plain lines on stderr otherwise (tqdm would print nothing there).
    lines = progress and not sys.stderr.isatty()
    if lines:
        print(f"evaluating {config.num_sets} sets in {len(starts)} batches on {device}: the "
              f"model and {', '.join(config.baselines) or 'no baselines'}", file=sys.stderr,
              flush=True)
    t0 = last = time.time()
    for i, start in enumerate(tqdm(starts, desc="evaluating", unit="batch",
                                   disable=not progress or lines, dynamic_ncols=True)):
        size = min(config.batch_size, config.num_sets - start)
        batch = sampler.batch(i, size, rank=0, stream=EVALUATION_STREAM)
        first = batch if first is None else first
        totals += validation_sums(model, [batch], config, data,
                                  derive_seed(seed, EVALUATION_STREAM + "-baselines", 0, i),
                                  refinement=refinement).cpu()
        now = time.time()
        if lines and (i == 0 or i + 1 == len(starts) or now - last >= PROGRESS_EVERY_S):
            last = now
            eta = (now - t0) / (i + 1) * (len(starts) - i - 1)
            print(f"evaluating: batch {i + 1}/{len(starts)} ({100 * (i + 1) // len(starts)}%), "
                  f"{now - t0:.0f} s elapsed, about {eta:.0f} s left", file=sys.stderr,
                  flush=True)
    assert first is not None  # num_sets >= 1 (ValidationConfig)
    return summarise(totals, shape), first


def data_name(label: str) -> str:
    """How a report names the prior of its bank."""
    return "the run's own data config" if label == OWN_DATA else f"data preset {label!r}"


def markdown_report(result: dict[str, Any]) -> str:
    """The markdown report of an ``evaluation.json`` result."""
    description = (f"data: {data_name(result['data_preset'])}, {result['num_sets']} sets "
                   f"(stream {result['stream']!r}, seed {result['seed']})")
    return markdown(Results.from_json(result), f"Evaluation of {result['model_path']}",
                    description)


def evaluate_saved_model(path: str | Path, *, data_preset: str | None = None,
                         num_sets: int = 1024, batch_size: int = 32, seed: int | None = None,
                         baselines: Sequence[str] = DEFAULT_BASELINES, device: str = "auto",
                         out: str | Path | None = None, config_dirs: Sequence[str] = (),
                         progress: bool = True, refine_iterations: int | None = None
                         ) -> tuple[dict[str, Any], Path]:
    """Score a saved model and write evaluation.json, evaluation.md and plots.

    Args:
        path: a run folder (its final/ is used), or a final/ or best/ folder.
        data_preset: the prior of the held-out bank (default: the run's own data config).
        num_sets, batch_size: bank size and sets per batch.
        seed: seed of the bank and of the baselines (default: the run's).
        baselines: the baselines to score, in report order.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        out: output folder (default: ``RUN_DIR/evaluation/<data preset>[-best]/``).
        config_dirs: extra preset folders, as ``gmmt.run --config-dir``.
        refine_iterations: also score the model refined by EM from its clusters
            (``refined``, ``refined_told_k``) with at most this many iterations; 0 scores the
            raw model only; ``None``: as the run's ``model.refinement`` says.

    Returns:
        The result written to evaluation.json and the output folder.

    Raises:
        EvaluationError, ConfigError: bad inputs, before anything is written.
    """
    if num_sets < 1 or batch_size < 1:
        raise EvaluationError(f"--num-sets and --batch-size must be >= 1, got "
                              f"{num_sets} and {batch_size}")
    if refine_iterations is not None and refine_iterations < 0:
        raise EvaluationError(f"--refine must be >= 0 (0: no refinement), got "
                              f"{refine_iterations}")
    folder = find_model_folder(Path(path))
    saved = ExperimentConfig.load(folder / CONFIG_FILE)
    data = preset_data(data_preset, config_dirs) if data_preset else saved.data
    if data.dim != saved.data.dim:
        raise EvaluationError(f"data preset {data_preset!r} has dim {data.dim}, but the "
                              f"model was trained on dim {saved.data.dim}")
    unknown = [b for b in baselines if b not in ALL_BASELINES]
    if unknown:
        raise EvaluationError(f"unknown baseline(s) {', '.join(map(repr, unknown))}; choose "
                              f"from {', '.join(ALL_BASELINES)}")
    torch_device = pick_device(device)
    seed = saved.device.seed if seed is None else seed
    baselines = list(dict.fromkeys(baselines))  # keep order, drop repeats
    config = evaluation_config(saved, num_sets, batch_size, baselines)
    run_dir = folder.parent
    label = data_preset or OWN_DATA
    default_out = run_dir / "evaluation" / (label if folder.name == "final"
                                             else f"{label}-{folder.name}")
    out = Path(out) if out else default_out

    model = load_model(folder, torch_device)
    refinement = saved.model.refinement
    if refine_iterations is not None:
        refinement = RefinementConfig(enabled=refine_iterations > 0,
                                      iterations=max(refine_iterations, 1))
    results, first = score_held_out(model, data, config, seed, torch_device, progress,
                                    refinement)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = run_dir / "metrics.jsonl"
    plots = draw_plots(config, out, model, first, results,
                       jsonl if jsonl.is_file() else None, seed)
    result = {
        "model_path": str(folder), "data_preset": label, "data": unstructure(data),
        "num_sets": num_sets, "batch_size": batch_size, "seed": seed,
        "stream": EVALUATION_STREAM, "device": str(torch_device),
        "refine_iterations": refinement.iterations if refinement.enabled else 0,
        **results.to_json(),
        "plots": sorted(p.name for p in plots.values()),
    }
    write_json_atomic(out / "evaluation.json", result)
    (out / "evaluation.md").write_text(markdown_report(result))
    return result, out
