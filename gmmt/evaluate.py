"""Command line: ``python -m gmmt.evaluate RUN_DIR_OR_MODEL`` scores a saved model.

The model and every baseline (identity, oracle, EM, k-means) are scored with every metric,
broken down by SNR bin and by K, on a held-out bank drawn from the run's own data prior or from
any data preset. Writes ``evaluation.json``, ``evaluation.md`` (the printed table) and plots.

The bank comes from its own data stream, ``"evaluation"`` (see ``gmmt.data.gmm.derive_seed``):
with the run's seed it shares no set with the training batches (stream ``"train"``) or with the
validation bank used for early stopping and best/ (stream ``"validation"``), so the scores are
not biased by model selection. Mistakes (a missing path, an unknown preset) print a message and
exit with code 2.
"""

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from tqdm.auto import tqdm

from gmmt.config.converter import check, structure, unstructure
from gmmt.config.data import DataConfig
from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.presets import PresetStore, preset_dirs
from gmmt.config.validation import (
    BaselineName,
    BreakdownConfig,
    MetricName,
    ValidationConfig,
    VisualizationConfig,
)
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler, derive_seed
from gmmt.evaluation.report import draw_plots, flatten_sections, sections
from gmmt.evaluation.validate import COUNT, averages, metric_keys, validation_sums
from gmmt.training.checkpoint import CONFIG_FILE, MODEL_FILE, load_model, write_json_atomic

EXIT_USAGE = 2
EVALUATION_STREAM = "evaluation"
ALL_METRICS: tuple[str, ...] = get_args(MetricName)
ALL_BASELINES: tuple[str, ...] = get_args(BaselineName)
ALL_PLOTS = ["sample_grid", "training_curves", "error_vs_snr"]
# What an evaluation without --data-preset is filed under: the run's own data prior.
OWN_DATA = "training_data"

EPILOG = """\
examples:
  python -m gmmt.evaluate runs/quick_test-20250101-120000
  python -m gmmt.evaluate runs/my_run/best --data-preset complex --num-sets 4096
  python -m gmmt.evaluate runs/my_run --baselines oracle kmeans --json > scores.json
"""


class EvaluationError(Exception):
    """A usage mistake reported as one line and exit code 2 (never a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gmmt.evaluate", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a saved gmmt model against the classical baselines on a held-out "
                    "bank (its own data stream, never the training or validation sets).")
    p.add_argument("path", metavar="RUN_DIR_OR_MODEL",
                   help="a run folder (its final/ is used) or a final/ or best/ folder")
    p.add_argument("--data-preset", metavar="NAME",
                   help="data preset to evaluate on (default: the run's own data config)")
    p.add_argument("--num-sets", type=int, default=1024, metavar="N",
                   help="sets in the held-out bank (default: 1024)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="sets per batch; lower it for large N (the energy metric holds "
                        "B*(N+K)^2 distances) (default: 32)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="seed of the held-out bank and of the baselines (default: the run's)")
    p.add_argument("--baselines", nargs="*", choices=ALL_BASELINES, default=list(ALL_BASELINES),
                   metavar="NAME", help=f"baselines to score (default: all of "
                                        f"{', '.join(ALL_BASELINES)})")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... or auto (cuda when available; default)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: RUN_DIR/evaluation/<data preset>/, with "
                        "'-best' appended for a best/ model)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON result instead of the markdown table")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="extra preset folder (as in gmmt.run; repeatable)")
    return p


# --- inputs --------------------------------------------------------------------------------


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


def preset_data(name: str, config_dirs: Sequence[str]) -> DataConfig:
    """The data config ``gmmt.run --data-preset NAME`` would train on (defaults + preset)."""
    store = PresetStore(preset_dirs(config_dirs))
    body = store.resolve_data_params({"data": store.resolve("data", name)})["data"]
    data = structure(body, DataConfig)
    check(data)
    return data


def pick_device(name: str) -> torch.device:
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
    metrics = list(ALL_METRICS)
    if not {"em", "oracle"} <= set(baselines):
        metrics.remove("gap_closed")  # defined through the EM and oracle errors
    grid = saved.validation.visualization.baseline
    if grid not in baselines:  # the run's grid baseline, else the strongest one scored
        grid = next((b for b in ("em", "kmeans", "oracle", "identity") if b in baselines), grid)
    plots = ALL_PLOTS if baselines else [p for p in ALL_PLOTS if p != "sample_grid"]
    config = ValidationConfig(
        num_sets=num_sets, batch_size=batch_size, every_n_steps=0, metrics=metrics,
        baselines=list(baselines), em=saved.validation.em,
        breakdown=BreakdownConfig(by_snr=True, snr_bins=saved.validation.breakdown.snr_bins,
                                  by_k=True, by_separation=True),
        visualization=VisualizationConfig(
            enabled=True, plots=plots, baseline=grid,
            num_examples=saved.validation.visualization.num_examples))
    check(config)
    return config


# --- scoring -------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, data: DataConfig, config: ValidationConfig, seed: int,
             device: torch.device, progress: bool = True
             ) -> tuple[dict[str, float], GMMBatch, dict[str, int]]:
    """Flat metrics of the model and baselines on the held-out bank, its first batch, and the
    number of sets in each breakdown bin (``{"by_snr.12_13": 410, ...}``).

    Batches are drawn one at a time (a large bank never sits in memory at once) from the
    ``"evaluation"`` stream; each batch's baselines get their own seed.
    """
    sampler = GMMSampler(data, seed, device)
    keys = metric_keys(config, data)
    totals = {k: torch.zeros((), dtype=torch.float64) for k in keys}
    starts = range(0, config.num_sets, config.batch_size)
    first = None
    for i, start in enumerate(tqdm(starts, desc="evaluating", unit="batch",
                                   disable=not progress or None, dynamic_ncols=True)):
        size = min(config.batch_size, config.num_sets - start)
        batch = sampler.batch(i, size, rank=0, stream=EVALUATION_STREAM)
        first = batch if first is None else first
        sums = validation_sums(model, [batch], config, data,
                               derive_seed(seed, EVALUATION_STREAM + "-baselines", 0, i))
        for k in keys:
            if k in sums:
                totals[k] += torch.as_tensor(sums[k], dtype=torch.float64).cpu()
    counts = {k.removesuffix("." + COUNT): int(v) for k, v in totals.items()
              if k.endswith("." + COUNT)}
    return averages(totals), first, counts


# --- report --------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _breakdown(metrics: dict[str, float], counts: dict[str, int], prefix: str,
               methods: Sequence[str], metric: str, title: str) -> list[str]:
    """A table of ``metric`` per bin (``by_snr``/``by_k``/``by_sep``) for every method that has
    it, after the number of sets in the bin."""
    bins: list[str] = []
    for k in metrics:
        if k.startswith(prefix + ".") and k.endswith("." + metric):
            label = k[len(prefix) + 1:].split(".baselines.")[0].removesuffix("." + metric)
            if label not in bins:
                bins.append(label)
    if not bins:
        return []

    def order(label: str) -> tuple[float, str]:
        try:
            return (float(label.split("_")[0]), label)
        except ValueError:
            return (math.inf, label)

    bins.sort(key=order)
    columns = [m for m in methods
               if any(_key(prefix, b, m, metric) in metrics for b in bins)]
    rows = [[b, str(counts.get(f"{prefix}.{b}", "—"))]
            + [_fmt(metrics.get(_key(prefix, b, m, metric))) for m in columns] for b in bins]
    head = {"by_snr": "SNR bin (dB)", "by_k": "K", "by_sep": "closest centres (σ)"}[prefix]
    return ["", f"### {title}", "", *_table([head, "sets", *columns], rows)]


def _key(prefix: str, label: str, method: str, metric: str) -> str:
    middle = "" if method == "model" else f"baselines.{method}."
    return f"{prefix}.{label}.{middle}{metric}"


def data_name(label: str) -> str:
    return "the run's own data config" if label == OWN_DATA else f"data preset {label!r}"


def markdown(result: dict[str, Any]) -> str:
    """The summary table (model + each baseline) and the per-SNR / per-K breakdowns."""
    metrics = flatten_sections(result)
    model = result["model"]
    lines = [f"## Evaluation of {result['model_path']}", "",
             f"data: {data_name(result['data_preset'])}, {result['num_sets']} sets (stream "
             f"{result['stream']!r}, seed {result['seed']})", ""]
    header = ["", "MSE", "MSE/σ²", "ARI", "NMI", "gap closed"]
    rows = [["model", *(_fmt(model.get(m)) for m in ("mse", "mse_over_noise", "ari", "nmi",
                                                      "gap_closed"))]]
    for name, values in result["baselines"].items():
        rows.append([name, *(_fmt(values.get(m)) for m in ("mse", "mse_over_noise", "ari",
                                                           "nmi")), "—"])
    lines += _table(header, rows)
    methods = ["model", *result["baselines"]]
    counts = result.get("sets_per_bin", {})
    lines += _breakdown(metrics, counts, "by_snr", methods, "mse_over_noise", "MSE/σ² by SNR")
    lines += _breakdown(metrics, counts, "by_k", methods, "mse_over_noise", "MSE/σ² by K")
    lines += _breakdown(metrics, counts, "by_sep", methods, "mse",
                        "MSE by the distance between the two closest centres")
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Evaluate as the arguments say; returns the result written to evaluation.json and the
    output folder."""
    if args.num_sets < 1 or args.batch_size < 1:
        raise EvaluationError(f"--num-sets and --batch-size must be >= 1, got "
                              f"{args.num_sets} and {args.batch_size}")
    folder = find_model_folder(Path(args.path))
    saved = ExperimentConfig.load(folder / CONFIG_FILE)
    data = preset_data(args.data_preset, args.config_dir) if args.data_preset else saved.data
    if data.dim != saved.data.dim:
        raise EvaluationError(f"data preset {args.data_preset!r} has dim {data.dim}, but the "
                              f"model was trained on dim {saved.data.dim}")
    device = pick_device(args.device)
    seed = saved.device.seed if args.seed is None else args.seed
    baselines = list(dict.fromkeys(args.baselines))  # keep order, drop repeats
    config = evaluation_config(saved, args.num_sets, args.batch_size, baselines)
    run_dir = folder.parent
    label = args.data_preset or OWN_DATA
    default_out = run_dir / "evaluation" / (label if folder.name == "final"
                                             else f"{label}-{folder.name}")
    out = Path(args.out) if args.out else default_out

    model = load_model(folder, device)
    metrics, first, counts = evaluate(model, data, config, seed, device)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = run_dir / "metrics.jsonl"
    plots = draw_plots(config, out, model, first, metrics,
                       jsonl if jsonl.is_file() else None, seed)
    result = {
        "model_path": str(folder), "data_preset": label, "data": unstructure(data),
        "num_sets": args.num_sets, "batch_size": args.batch_size, "seed": seed,
        "stream": EVALUATION_STREAM, "device": str(device),
        **sections(metrics),
        "sets_per_bin": counts,
        "plots": sorted(p.name for p in plots.values()),
    }
    write_json_atomic(out / "evaluation.json", result)
    (out / "evaluation.md").write_text(markdown(result))
    return result, out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, out = run(args)
    except (EvaluationError, ConfigError, FileNotFoundError) as err:
        print(f"gmmt.evaluate: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gmmt.evaluate: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result), end="")
        print(f"\nwrote evaluation.json, evaluation.md and {len(result['plots'])} plot(s) "
              f"to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
