"""ExperimentManager: one experiment from config to summary, on Hugging Face Accelerate.

The eight steps: (1) run folder, (2) data streams, (3) model, (4) optimizer, schedule and loss,
(5) the loop, (6) validation, (7) metrics and trackers, (8) checkpoints. Batches are a pure
function of (seed, stream, rank, step), so a resumed run needs no loader state.
"""

import copy
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from gmmt.config.experiment import ExperimentConfig
from gmmt.config.fields import ConfigError
from gmmt.config.overrides import diff, format_diff
from gmmt.data.gmm import GMMSampler, validation_bank
from gmmt.evaluation.report import draw_plots, flatten_sections, sections
from gmmt.evaluation.validate import averages, metric_keys, validation_sums
from gmmt.model.build import build_model, count_parameters
from gmmt.training.checkpoint import (
    TRAINER_STATE,
    export_model,
    finish_checkpoint,
    latest_checkpoint,
    temporary_checkpoint_dir,
    write_json_atomic,
)
from gmmt.training.losses import compute_loss
from gmmt.training.optim import WeightEMA, build_optimizer, build_scheduler
from gmmt.training.tracking import Trackers, setup_logging, tracker_problems

log = logging.getLogger("gmmt")

# Settings a resumed run may not change: they define the model, the data stream or its layout.
LOCKED_ON_RESUME = ("model", "data", "device.seed", "training.batch_size",
                    "training.gradient_accumulation_steps")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for ``training.max_nonfinite_steps`` steps in a row."""


def build_accelerator(config: ExperimentConfig) -> Accelerator:
    """An Accelerator for the configured device and precision ('auto' defers to the launcher)."""
    device = config.device.device
    precision = config.device.mixed_precision
    problems = []
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("device 'cuda' was requested but no CUDA GPU is visible @ $.device.device")
    if device == "mps" and not torch.backends.mps.is_available():
        problems.append("device 'mps' was requested but MPS is not available @ $.device.device")
    if device == "tpu":
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            problems.append("device 'tpu' needs torch_xla (pip install torch_xla) "
                            "@ $.device.device")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if precision == "fp16" and not on_gpu:
        problems.append("fp16 needs a CUDA GPU and none will be used; use 'bf16' or 'no' "
                        "@ $.device.mixed_precision")
    if problems:
        raise ConfigError(problems, "cannot run this configuration here")
    if device == "cuda" and config.device.gpu_id is not None:
        torch.cuda.set_device(config.device.gpu_id)
    if config.device.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != precision:
        log.warning("the launcher asked for mixed precision %r; the config's "
                    "device.mixed_precision=%r is used (set it with --set "
                    "device.mixed_precision=%s)", launcher, precision, launcher)
    return Accelerator(cpu=(device == "cpu"), mixed_precision=precision)


def _get(config_dict: dict, dotted: str) -> Any:
    out: Any = config_dict
    for key in dotted.split("."):
        out = out[key]
    return out


def find_resume_checkpoint(resume: str | Path, config: ExperimentConfig) -> Path:
    """``latest``: the newest run of this exp_name with a checkpoint; else a run or checkpoint
    folder."""
    if str(resume) == "latest":
        base = Path(config.paths.base_dir)
        runs = sorted(p for p in base.glob(f"{config.metadata.exp_name}-*") if p.is_dir())
        for run in reversed(runs):
            found = latest_checkpoint(run)
            if found is not None:
                return found
        raise ConfigError([f"no run of {config.metadata.exp_name!r} with a checkpoint under "
                           f"{base}/"], "nothing to resume")
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ConfigError([f"{path} is neither a checkpoint nor a run folder with one"],
                          "nothing to resume")
    return found


class ExperimentManager:
    """Runs one experiment. ``run()`` returns the final summary (also written to summary.json).

    Args:
        config: the resolved experiment configuration.
        resume: ``"latest"``, a run folder or a checkpoint folder to continue from.
        stop_after_steps: stop (with a checkpoint) once this many optimizer steps are done,
            without changing the schedule (for time-boxed jobs and tests).
        loss_hook: ``f(step, loss) -> loss`` applied to every micro-batch loss (tests inject
            NaN through it).
    """

    def __init__(self, config: ExperimentConfig, resume: str | Path | None = None,
                 stop_after_steps: int | None = None,
                 loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        config.validate()
        self.config = config
        self.resume = resume
        self.stop_after_steps = stop_after_steps
        self.loss_hook = loss_hook
        self._stop_signal: str | None = None
        self._baseline_cache: dict = {}

    # --- (1) run folder ---------------------------------------------------------------------

    def _run_dir(self, acc: Accelerator) -> tuple[Path, Path | None]:
        checkpoint = None
        if self.resume is not None:
            checkpoint = find_resume_checkpoint(self.resume, self.config)
            run_dir = checkpoint.parent.parent
            self._check_resume_config(run_dir)
        else:
            run_dir = None
            if acc.is_main_process:
                base = Path(self.config.paths.base_dir)
                stamp = time.strftime("%Y%m%d-%H%M%S")
                run_dir = base / f"{self.config.metadata.exp_name}-{stamp}"
                suffix = 1
                while run_dir.exists():
                    suffix += 1
                    run_dir = base / f"{self.config.metadata.exp_name}-{stamp}-{suffix}"
                (run_dir / "checkpoints").mkdir(parents=True)
                (run_dir / "plots").mkdir()
            run_dir = Path(broadcast_object_list([str(run_dir)])[0])
        return run_dir, checkpoint

    def _check_resume_config(self, run_dir: Path) -> None:
        saved = ExperimentConfig.load(run_dir / "config.json").to_dict()
        new = self.config.to_dict()
        locked = []
        for path in LOCKED_ON_RESUME:
            for p, old, now in diff(_get(saved, path), _get(new, path), path):
                locked.append(f"{p} is locked on resume: the run has {json.dumps(old)}, "
                              f"this config {json.dumps(now)}")
        if locked:
            raise ConfigError(locked, f"cannot resume {run_dir}")
        self._resume_diff = [c for c in diff(saved, new) if not c[0].startswith("metadata.")]

    # --- the whole run ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        problems = tracker_problems(cfg)
        if problems:
            raise ConfigError(problems, "cannot log as configured")
        acc = build_accelerator(cfg)
        run_dir, checkpoint = self._run_dir(acc)
        self.run_dir = run_dir
        main = acc.is_main_process
        setup_logging(run_dir, cfg, main)
        if main:
            cfg.save(run_dir / "config.json")
            log.info("run folder: %s", run_dir)
            log.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=2))
            if checkpoint is not None:
                log.info("resuming from %s; changes against the run's config:\n%s",
                         checkpoint, format_diff(getattr(self, "_resume_diff", [])))

        # (2) data streams: training batches per (rank, step); one validation bank for all.
        set_seed(cfg.device.seed)
        sampler = GMMSampler(cfg.data, cfg.device.seed, acc.device)
        bank = validation_bank(cfg.data, cfg.device.seed, cfg.validation.num_sets,
                               cfg.validation.batch_size, acc.device)
        my_bank = bank[acc.process_index::acc.num_processes]

        # (3) model, (4) optimizer, schedule, EMA.
        raw_model = build_model(cfg.model, cfg.data.dim).to(acc.device)
        num_params = count_parameters(raw_model)
        log.info("model: %s parameters, effective depth %d", f"{num_params:,}",
                 cfg.model.transformer.effective_depth)
        optimizer = build_optimizer(raw_model, cfg.training.optimizer)
        scheduler = build_scheduler(optimizer, cfg.training.scheduler, cfg.training.total_steps)
        ema = WeightEMA(raw_model, cfg.training.ema.decay) if cfg.training.ema.enabled else None
        model = torch.compile(raw_model) if cfg.training.compile else raw_model
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped by us, once per optimizer step
        if ema is not None:
            acc.register_for_checkpointing(ema)

        state = {"step": 0, "epoch": 0, "best_metric": None, "best_step": None,
                 "evals_without_improvement": 0, "nonfinite_in_a_row": 0,
                 "skipped_steps": 0, "wandb_run_id": None}
        if checkpoint is not None:
            acc.load_state(str(checkpoint))  # after prepare(), or it silently does nothing
            state.update(json.loads((checkpoint / TRAINER_STATE).read_text()))
        trackers = Trackers(run_dir if main else None, cfg if main else None,
                            state["wandb_run_id"])
        state["wandb_run_id"] = trackers.wandb_run_id

        previous = signal.signal(signal.SIGTERM, self._on_signal)
        start = time.time()
        try:
            summary = self._loop(acc, cfg, model, raw_model, optimizer, scheduler, ema, sampler,
                                 my_bank, trackers, state, run_dir, num_params)
        finally:
            signal.signal(signal.SIGTERM, previous)
            trackers.finish()
        summary["train_time_s"] = round(time.time() - start, 3)
        if main:
            write_json_atomic(run_dir / "summary.json", summary)
            log.info("summary: %s", json.dumps(summary))
        acc.wait_for_everyone()
        return summary

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name

    # --- (5) the loop -----------------------------------------------------------------------

    def _loop(self, acc: Accelerator, cfg: ExperimentConfig, model: torch.nn.Module,
              raw_model: torch.nn.Module, optimizer: Any, scheduler: Any,
              ema: WeightEMA | None, sampler: GMMSampler, bank: list, trackers: Trackers,
              state: dict, run_dir: Path, num_params: int) -> dict[str, Any]:
        tcfg = cfg.training
        accum = tcfg.gradient_accumulation_steps
        total = tcfg.total_steps
        flow = cfg.model.transformer.flow
        aux_weight = flow.aux_loss_weight if flow.enabled and flow.snr_source == "estimated" \
            else 0.0
        main = acc.is_main_process
        bar = tqdm(total=total, initial=state["step"], disable=not (main and
                   cfg.logging.progress_bar) or None, desc=run_dir.name, dynamic_ncols=True)
        window_loss = torch.zeros((), device=acc.device)
        window_points, window_steps, window_start = 0, 0, time.time()
        stopped_by = None

        while state["step"] < total:
            step = state["step"]
            for micro in range(accum):
                batch = sampler.batch(step * accum + micro, tcfg.batch_size, acc.process_index)
                syncing = micro == accum - 1
                with nullcontext() if syncing else acc.no_sync(model):
                    pred, snr_estimate = model(batch.points, batch.mask, batch.snr_db,
                                               return_aux=True)
                    loss = compute_loss(tcfg.loss, pred, batch)
                    # Always include the estimate (even at weight 0): the estimator would
                    # otherwise get no gradient, and DDP rejects unused parameters.
                    if snr_estimate is not None:
                        scale = flow.snr_scale_db
                        aux = ((snr_estimate.float() - batch.snr_db) / scale).square().mean()
                        loss = loss + aux_weight * aux
                    if self.loss_hook is not None:
                        loss = self.loss_hook(step, loss)
                    acc.backward(loss / accum)
                window_loss += loss.detach() / accum
                window_points += int(batch.point_counts().sum()) * acc.num_processes

            # NaN/inf guard: gradients are already all-reduced, so every rank agrees.
            if tcfg.gradient_clip_norm is not None:
                grad_norm = acc.clip_grad_norm_(model.parameters(), tcfg.gradient_clip_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in model.parameters() if p.grad is not None]))
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                state["nonfinite_in_a_row"] += 1
                state["skipped_steps"] += 1
                log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                            step + 1, state["nonfinite_in_a_row"])
                if state["nonfinite_in_a_row"] >= tcfg.max_nonfinite_steps:
                    bar.close()
                    raise TrainingDiverged(
                        f"loss was NaN/inf for {state['nonfinite_in_a_row']} steps in a row "
                        f"(training.max_nonfinite_steps); no checkpoint was written for them. "
                        f"Lower training.optimizer.lr or set training.gradient_clip_norm.")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["nonfinite_in_a_row"] = 0
                if ema is not None:
                    ema.update(raw_model)
            scheduler.step()
            state["step"] = step = step + 1
            state["epoch"] = step // tcfg.steps_per_epoch
            window_steps += 1
            bar.update(1)

            if step % cfg.logging.log_every_n_steps == 0 or step == total:
                mean_loss = acc.reduce(window_loss, "mean").item() / window_steps
                elapsed = max(time.time() - window_start, 1e-9)
                scalars = {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm),
                           "train/points_per_s": window_points / elapsed,
                           "train/epoch": step / tcfg.steps_per_epoch}
                trackers.log(scalars, step)
                bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{scalars['train/lr']:.2e}",
                                pts_s=f"{scalars['train/points_per_s']:.3g}")
                log.debug("step %d %s", step, scalars)
                window_loss.zero_()
                window_points, window_steps, window_start = 0, 0, time.time()

            every = cfg.validation.every_n_steps
            if every and step % every == 0 and step != total and self._validate_and_track(
                    acc, cfg, raw_model, ema, bank, trackers, state, run_dir, step):
                stopped_by = "early stopping"
            ckpt_every = tcfg.checkpointing.every_n_steps
            if ckpt_every and step % ckpt_every == 0 and step != total:
                self._checkpoint(acc, run_dir, state, raw_model)
            stop = self._stop_signal is not None or (
                self.stop_after_steps is not None and step >= self.stop_after_steps)
            if acc.num_processes > 1:
                flag = torch.tensor(float(stop), device=acc.device)
                stop = bool(acc.reduce(flag, "sum").item() > 0)
            if stop or stopped_by:
                stopped_by = stopped_by or self._stop_signal or "stop_after_steps"
                if not (ckpt_every and step % ckpt_every == 0):
                    self._checkpoint(acc, run_dir, state, raw_model)
                break
        bar.close()

        finished = state["step"] >= total or stopped_by == "early stopping"
        summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": state["step"],
                                   "total_steps": total, "parameters": num_params,
                                   "skipped_steps": state["skipped_steps"]}
        if not finished:
            log.info("stopped at step %d by %s; continue with --resume latest (or --resume %s)",
                     state["step"], stopped_by, run_dir)
            summary["stopped_by"] = stopped_by
            return summary
        if stopped_by:
            summary["stopped_by"] = stopped_by
        final = self._validate_and_track(acc, cfg, raw_model, ema, bank, trackers, state,
                                         run_dir, state["step"], final=True)
        self._checkpoint(acc, run_dir, state, raw_model)
        if main:
            eval_model = self._eval_model(raw_model, ema)
            export_model(eval_model, cfg, run_dir / "final", {"step": state["step"]})
            if cfg.validation.visualization.enabled:  # after the results are safely saved
                images = draw_plots(cfg.validation, run_dir / "plots", eval_model, bank[0],
                                    flatten_sections(final), run_dir / "metrics.jsonl",
                                    cfg.device.seed)
                trackers.log_images(images, state["step"])
        summary.update(final)
        if acc.num_processes > 1:
            summary["ranks_in_sync"] = self._ranks_in_sync(acc, raw_model)
        summary["best"] = {"step": state["best_step"], "metric": tcfg.early_stopping.metric,
                           "value": state["best_metric"]}
        return summary

    @staticmethod
    def _ranks_in_sync(acc: Accelerator, raw_model: torch.nn.Module) -> bool:
        """Whether every process ended with the same weights (a DDP sanity check)."""
        fingerprint = torch.stack([p.detach().double().sum() for p in raw_model.parameters()])
        everyone = acc.gather(fingerprint.unsqueeze(0))  # [processes, params]
        in_sync = bool((everyone == everyone[0]).all())
        if not in_sync:
            log.warning("processes ended with different weights; the run is not trustworthy")
        return in_sync

    # --- (6) validation, (7) tracking -------------------------------------------------------

    @staticmethod
    def _eval_model(raw_model: torch.nn.Module, ema: WeightEMA | None) -> torch.nn.Module:
        if ema is None:
            return raw_model
        averaged = copy.deepcopy(raw_model)
        ema.copy_to(averaged)
        return averaged

    def _validate_and_track(self, acc: Accelerator, cfg: ExperimentConfig,
                            raw_model: torch.nn.Module, ema: WeightEMA | None, bank: list,
                            trackers: Trackers, state: dict, run_dir: Path, step: int,
                            final: bool = False) -> Any:
        """Validate, log, keep best/; returns True when early stopping says stop (or, with
        ``final``, the summary sections)."""
        eval_model = self._eval_model(raw_model, ema)
        # Baselines do not depend on the model: score them once on the fixed bank.
        sums = validation_sums(eval_model, bank, cfg.validation, cfg.data, cfg.device.seed,
                               self._baseline_cache)
        keys = metric_keys(cfg.validation, cfg.data)
        vector = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64,
                                              device=acc.device) for k in keys])
        vector = acc.reduce(vector, "sum")
        metrics = averages(dict(zip(keys, vector.cpu())))
        trackers.log({f"val/{k}": v for k, v in metrics.items()}, step)
        log.info("step %d validation: %s", step,
                 ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()))

        es = cfg.training.early_stopping
        if es.metric not in metrics:
            raise ConfigError([f"early_stopping.metric {es.metric!r} is not computed; choose one "
                               f"of {sorted(metrics)} @ $.training.early_stopping.metric"])
        value = metrics[es.metric]
        best = state["best_metric"]
        if best is None or value < best - es.min_delta:
            state.update(best_metric=value, best_step=step, evals_without_improvement=0)
            if acc.is_main_process and cfg.training.checkpointing.save_best:
                export_model(eval_model, cfg, run_dir / "best", {"step": step, es.metric: value})
        else:
            state["evals_without_improvement"] += 1
        if final:
            return sections(metrics)
        return es.enabled and state["evals_without_improvement"] >= es.patience

    # --- (8) checkpoints --------------------------------------------------------------------

    def _checkpoint(self, acc: Accelerator, run_dir: Path, state: dict,
                    raw_model: torch.nn.Module) -> None:
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise TrainingDiverged("model weights are not finite; refusing to checkpoint them")
        step = state["step"]
        tmp = temporary_checkpoint_dir(run_dir, step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = finish_checkpoint(run_dir, step, state,
                                     self.config.training.checkpointing.keep_last)
            log.info("checkpoint: %s", path)
        acc.wait_for_everyone()
