"""Where metrics go: metrics.jsonl always; wandb and tensorboard when configured.

Only the main process creates trackers; other ranks get a :class:`Trackers` with no sinks.
"""

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path

from gmmt.config.experiment import ExperimentConfig
from gmmt.evaluation.results import MODEL, Results

log = logging.getLogger("gmmt")

# Told more than the model (oracle: the truth; the floors: sigma, the prior and K) or nothing at all
# (identity): the model is compared with the best of the other baselines, its peers.
_NOT_PEERS = ("identity", "oracle", "bayes", "bayes_unknown_k")
# Derived gaps, shown when validation computed them (gmmt.evaluation.validate).
_GAPS = ("excess_over_bayes", "reachable_gap", "gap_closed")
_MAX_DIFF_LINES = 12


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 days``: a rough size, for projections and ETAs."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def preset_changes(config: ExperimentConfig) -> list[str] | None:
    """``path: old -> new`` lines of ``config`` against its bare experiment preset.

    The preset is rebuilt from the packaged and ``GMMT_CONFIG_PATH`` folders; ``None`` when it
    cannot be (no preset recorded, or one from a ``--config-dir`` folder), so the caller falls
    back to the recorded overrides.
    """
    from gmmt.config.fields import ConfigError
    from gmmt.config.overrides import diff
    from gmmt.config.presets import resolve_config

    if config.metadata.preset is None:
        return None
    try:
        bare = resolve_config(config.metadata.preset, environ={
            k: v for k, v in os.environ.items() if k != "DEVICE"}).bare
    except ConfigError:
        return None
    from gmmt.config.data import DISTRIBUTION_FIELDS

    new = config.to_dict()
    lines: list[str] = []
    for path, old_value, new_value in diff(bare, new):
        if path.startswith("metadata."):
            continue
        keys = path.split(".")
        # A distribution is one setting: one line with both dicts, not one per parameter.
        cut = next((i + 1 for i, k in enumerate(keys[:-1]) if k in DISTRIBUTION_FIELDS), None)
        if cut is not None:
            path = ".".join(keys[:cut])
            old_value, new_value = _get(bare, keys[:cut]), _get(new, keys[:cut])
        line = f"{path}: {json.dumps(old_value)} -> {json.dumps(new_value)}"
        if line not in lines:
            lines.append(line)
    return lines


def _get(tree: dict, keys: list[str]) -> object:
    for key in keys:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree


def banner(config: ExperimentConfig, run_dir: Path, *, device: str, processes: int,
           num_params: int, resumed_from: Path | None = None) -> str:
    """What a run is, in a dozen lines, instead of the whole resolved config (config.json has
    it, and ``--print-config`` prints it)."""
    meta = config.metadata
    components = ", ".join(f"{k}={v}" for k, v in meta.component_presets.items())
    experiment = meta.preset or "(config file)"
    lines = [f"experiment  {experiment}" + (f" ({components})" if components else "")]
    changes = preset_changes(config)
    if changes is None:
        lines.append("overrides   " + (", ".join(meta.overrides) or "(none)"))
    else:
        shown = changes[:_MAX_DIFF_LINES]
        lines.append(f"changes     {len(changes)} against preset {experiment!r}"
                     + (":" if changes else ""))
        lines += [f"  {c}" for c in shown]
        if len(changes) > len(shown):
            lines.append(f"  ... {len(changes) - len(shown)} more (config.json has everything)")
    t = config.training
    lines += [
        f"run folder  {run_dir}" + (f" (resuming {resumed_from.name})" if resumed_from else ""),
        f"device      {device}, {processes} process{'es' if processes > 1 else ''}, "
        f"precision {config.device.mixed_precision}",
        f"model       {num_params:,} parameters, effective depth "
        f"{config.model.transformer.effective_depth}",
        f"training    {t.total_steps:,} steps of {t.batch_size} sets"
        + (f" x {t.gradient_accumulation_steps}" if t.gradient_accumulation_steps > 1 else "")
        + f", validation every {config.validation.every_n_steps or '(end only)'} steps",
        "full config config.json in the run folder (or --print-config)",
    ]
    return "\n".join(["gmmt run " + run_dir.name, *(f"  {line}" for line in lines)])


def progress_line(step: int, total: int, loss: float, lr: float, points_per_s: float,
                  eta_s: float | None) -> str:
    """One line of progress for logs without a terminal (nohup, CI, SLURM), where the
    progress bar hides itself."""
    eta = "" if eta_s is None else f", ETA {format_duration(eta_s)}"
    return (f"step {step}/{total} ({100 * step / total:.0f}%): loss {loss:.4g}, lr {lr:.2e}, "
            f"{points_per_s:,.0f} points/s{eta}")


def final_line(summary: dict) -> str:
    """The run's last console line: how long it took and how the model compares."""
    took = format_duration(summary.get("train_time_s", 0.0))
    head = f"done in {took}: {summary.get('steps', 0)}/{summary.get('total_steps', 0)} steps"
    if "model" not in summary:  # stopped early: no final validation
        return f"{head}; summary.json in {summary.get('run_dir')}"
    compared = validation_line(summary["steps"], Results.from_json(summary)).split(": ", 1)[1]
    return f"{head}; {compared}; summary.json in {summary.get('run_dir')}"


def validation_line(step: int, results: Results) -> str:
    """The model's MSE, MSE/sigma^2 and how it compares with the baselines present; the full
    flat keys go to metrics.jsonl only."""
    model = results.model
    parts = [f"model mse {model.get('mse', float('nan')):.5g}"]
    if "mse_over_noise" in model:
        parts[0] += f" (mse/σ² {model['mse_over_noise']:.4g})"
    refined = {name: results.overall[name]["mse"] for name in ("refined", "refined_told_k")
               if "mse" in results.overall.get(name, {})}
    if refined:
        parts.append(", ".join(f"{n} mse {v:.5g}" for n, v in refined.items()))
    others = {name: m["mse"] for name, m in results.overall.items()
              if name != MODEL and name not in refined and "mse" in m}
    if others:
        parts.append("baselines mse: " + ", ".join(f"{n} {v:.5g}" for n, v in others.items()))
    peers = {n: v for n, v in others.items() if n not in _NOT_PEERS}
    if peers and "mse" in model:
        best = min(peers, key=peers.__getitem__)
        if peers[best] > 0:
            parts.append(f"model/{best} {model['mse'] / peers[best]:.3f}")
    gaps = [f"{g} {model[g]:.3g}" for g in _GAPS if model.get(g) is not None]
    if gaps:
        parts.append(", ".join(gaps))
    return f"step {step} validation: " + "; ".join(parts)


def tracker_problems(config: ExperimentConfig) -> list[str]:
    """Configured trackers whose packages are missing (checked before a run folder exists)."""
    problems = []
    if config.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("logging.tensorboard needs the tensorboard package (pip install "
                            "tensorboard), or set it to false @ $.logging.tensorboard")
    return problems


class Trackers:
    """Fan-out of scalar metrics (and images) to every configured sink."""

    def __init__(self, run_dir: Path | None, config: ExperimentConfig | None = None,
                 wandb_run_id: str | None = None) -> None:
        self.run_dir = run_dir
        self._jsonl = None
        self._wandb = None
        self._tensorboard = None
        self.wandb_run_id = wandb_run_id
        if run_dir is None or config is None:
            return
        self._jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        wb = config.logging.wandb
        if wb.enabled and wb.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            self._start_wandb(config, run_dir)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def _start_wandb(self, config: ExperimentConfig, run_dir: Path) -> None:
        import wandb

        wb = config.logging.wandb
        self.wandb_run_id = self.wandb_run_id or secrets.token_hex(4)
        self._wandb = wandb.init(
            project=wb.project, entity=wb.entity, mode=wb.mode, dir=str(run_dir),
            id=self.wandb_run_id, resume="allow", name=run_dir.name,
            config=config.to_dict(), tags=config.metadata.tags or None,
            settings=wandb.Settings(console="off", silent=True, init_timeout=120),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": step, "time": time.time(),
                      **{k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
                         for k, v in clean.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tensorboard is not None:
            for key, value in clean.items():
                if isinstance(value, float):
                    self._tensorboard.add_scalar(key, value, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """Send PNG files to the trackers that take images."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def setup_logging(run_dir: Path | None, config: ExperimentConfig, is_main: bool) -> None:
    """Console and train.log handlers on the main process; warnings only elsewhere."""
    logger = logging.getLogger("gmmt")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(config.logging.console_level.upper() if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if is_main and run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setLevel(config.logging.file_level.upper())
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
