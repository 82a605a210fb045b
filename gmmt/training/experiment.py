"""ExperimentManager: one experiment from config to summary, on Hugging Face Accelerate.

The eight steps: (1) run folder, (2) data streams, (3) model, (4) optimizer, schedule and loss,
(5) the loop, (6) validation, (7) metrics and trackers, (8) checkpoints. Batches are a pure
function of (seed, stream, rank, step), so a resumed run needs no loader state.
"""

import copy
import json
import logging
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from gmmt.config.converter import unstructure
from gmmt.config.experiment import ExperimentConfig, resolve_mixed_precision
from gmmt.config.fields import ConfigError
from gmmt.config.overrides import format_diff
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler, validation_bank
from gmmt.evaluation.report import draw_plots
from gmmt.evaluation.results import Results
from gmmt.evaluation.validate import layout, summarise, validation_sums
from gmmt.model.build import build_model, count_parameters
from gmmt.saved_model import export_model, write_json_atomic
from gmmt.training.checkpoint import TRAINER_STATE, finish_checkpoint, temporary_checkpoint_dir
from gmmt.training.losses import compute_loss
from gmmt.training.optim import WeightEMA, build_optimizer, build_scheduler
from gmmt.training.setup import (
    LOCKED_ON_RESUME,
    build_accelerator,
    find_resume_checkpoint,
    make_run_dir,
    resume_changes,
)
from gmmt.training.tracking import (
    Trackers,
    banner,
    final_line,
    progress_line,
    setup_logging,
    tracker_problems,
    validation_line,
)

__all__ = ["LOCKED_ON_RESUME", "ExperimentManager", "TrainingDiverged", "build_accelerator"]

log = logging.getLogger("gmmt")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for ``training.max_nonfinite_steps`` steps in a row."""


def initial_state() -> dict[str, Any]:
    """Trainer state saved with every checkpoint (JSON)."""
    return {"step": 0, "epoch": 0, "best_metric": None, "best_step": None,
            "evals_without_improvement": 0, "nonfinite_in_a_row": 0, "skipped_steps": 0,
            "wandb_run_id": None}


@dataclass
class _Session:
    """Everything one run of the loop works with."""

    cfg: ExperimentConfig
    acc: Accelerator
    run_dir: Path
    model: torch.nn.Module  # as prepared by Accelerate (DDP / FSDP wrapper, or the model)
    raw_model: torch.nn.Module  # the GMMTransformer itself (shares parameters with ``model``)
    optimizer: Any
    scheduler: Any
    ema: WeightEMA | None
    sampler: GMMSampler
    curriculum_sampler: GMMSampler  # the data prior with training.curriculum's set sizes
    bank: list[GMMBatch]  # this process's share of the validation bank
    trackers: Trackers
    state: dict[str, Any]
    num_params: int
    sharded: bool = False  # FSDP: parameters live in shards; use the wrapper for everything
    baseline_cache: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


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
        # A boolean mixed_precision becomes the string it means here, so that Accelerate, the
        # saved config.json and a resume's comparison all see what actually ran.
        config.device.mixed_precision = resolve_mixed_precision(config.device)
        self.config = config
        self.resume = resume
        self.stop_after_steps = stop_after_steps
        self.loss_hook = loss_hook
        self.run_dir: Path | None = None
        self._stop_signal: str | None = None

    # --- (1)-(4) setup ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        problems = tracker_problems(cfg)
        if problems:
            raise ConfigError(problems, "cannot log as configured")
        checkpoint = changes = None
        if self.resume is not None:  # checked before anything is created
            checkpoint = find_resume_checkpoint(self.resume, cfg)
            changes = resume_changes(checkpoint.parent.parent, cfg)
        acc = build_accelerator(cfg)
        sharded = acc.distributed_type == DistributedType.FSDP
        if sharded and cfg.training.ema.enabled:
            raise ConfigError(["EMA is not supported with FSDP; set training.ema.enabled=false "
                               "@ $.training.ema.enabled"], "cannot run this configuration")
        run_dir = checkpoint.parent.parent if checkpoint else make_run_dir(acc, cfg)
        self.run_dir = run_dir
        setup_logging(run_dir, cfg, acc.is_main_process)
        if acc.is_main_process:
            cfg.save(run_dir / "config.json")
            # The console gets a short banner once the model is built; train.log keeps all.
            log.debug("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=2))
            if checkpoint is not None:
                log.info("resuming from %s; changes against the run's config:\n%s",
                         checkpoint, format_diff(changes or []))

        # (2) data: training batches per (rank, step); one validation bank for all processes.
        set_seed(cfg.device.seed)
        sampler = GMMSampler(cfg.data, cfg.device.seed, acc.device)
        curriculum = cfg.training.curriculum
        curriculum_sampler = GMMSampler(attrs.evolve(
            cfg.data, sample_count_distribution=curriculum.sample_count_distribution),
            cfg.device.seed, acc.device)
        if curriculum.steps:
            log.info("curriculum: the first %d steps draw N from %s", curriculum.steps,
                     json.dumps(unstructure(curriculum.sample_count_distribution)))
            if curriculum_sampler.config.max_points > cfg.data.max_points:
                log.warning("the curriculum draws up to %d points per set, more than the data "
                            "prior's %d: its steps are dearer, not cheaper",
                            curriculum_sampler.config.max_points, cfg.data.max_points)
        bank = validation_bank(cfg.data, cfg.device.seed, cfg.validation.num_sets,
                               cfg.validation.batch_size, acc.device)
        # Sharded models run every forward on every rank together: each evaluates all of it.
        my_bank = bank if sharded else bank[acc.process_index::acc.num_processes]

        # (3) model, (4) optimizer, schedule, EMA.
        raw_model = build_model(cfg.model, cfg.data.dim).to(acc.device)
        num_params = count_parameters(raw_model)
        if acc.is_main_process:
            log.info("%s", banner(cfg, run_dir, device=str(acc.device),
                                  processes=acc.num_processes, num_params=num_params,
                                  resumed_from=checkpoint))
        optimizer = build_optimizer(raw_model, cfg.training.optimizer)
        scheduler = build_scheduler(optimizer, cfg.training.scheduler, cfg.training.total_steps)
        ema = WeightEMA(raw_model, cfg.training.ema.decay) if cfg.training.ema.enabled else None
        model = torch.compile(raw_model) if cfg.training.compile else raw_model
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # stepped by us, once per optimizer step
        if ema is not None:
            acc.register_for_checkpointing(ema)
        state = initial_state()
        if checkpoint is not None:
            acc.load_state(str(checkpoint))  # after prepare(), or it silently does nothing
            state.update(json.loads((checkpoint / TRAINER_STATE).read_text()))
        main = acc.is_main_process
        trackers = Trackers(run_dir if main else None, cfg if main else None,
                            state["wandb_run_id"])
        state["wandb_run_id"] = trackers.wandb_run_id
        session = _Session(cfg, acc, run_dir, model, raw_model, optimizer, scheduler, ema,
                           sampler, curriculum_sampler, my_bank, trackers, state, num_params,
                           sharded)

        previous = signal.signal(signal.SIGTERM, self._on_signal)
        start = time.time()
        try:
            summary = self._loop(session)
        finally:
            signal.signal(signal.SIGTERM, previous)
            trackers.finish()
        summary["train_time_s"] = round(time.time() - start, 3)
        if main:
            write_json_atomic(run_dir / "summary.json", summary)
            log.debug("summary: %s", json.dumps(summary))
            log.info("%s", final_line(summary))
        acc.wait_for_everyone()
        return summary

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name

    # --- (5) the loop -----------------------------------------------------------------------

    def _loop(self, s: _Session) -> dict[str, Any]:
        cfg, acc, state = s.cfg, s.acc, s.state
        total = cfg.training.total_steps
        bar = tqdm(total=total, initial=state["step"], desc=s.run_dir.name, dynamic_ncols=True,
                   disable=not (s.main and cfg.logging.progress_bar) or None)
        # t0/step0 (never reset) give the ETA of the progress lines.
        window = {"loss": torch.zeros((), device=acc.device), "points": 0, "steps": 0,
                  "start": time.time(), "t0": time.time(), "step0": state["step"]}
        stopped_by = None
        while state["step"] < total:
            grad_norm = self._train_step(s, window)
            step = state["step"]
            bar.update(1)
            if step == cfg.training.curriculum.steps:
                log.info("curriculum done at step %d: N now follows data.sample_count_distribution",
                         step)
            # A log window also ends at the curriculum's last step: no window mixes set sizes,
            # and the plot can shade exactly the curriculum's steps.
            if (step % cfg.logging.log_every_n_steps == 0 or step == total
                    or step == cfg.training.curriculum.steps):
                self._log_training(s, window, grad_norm, bar)
            every = cfg.validation.every_n_steps
            if every and step % every == 0 and step != total and self._validate(s, step)[1]:
                stopped_by = "early stopping"
            ckpt_every = cfg.training.checkpointing.every_n_steps
            saved_now = bool(ckpt_every) and step % ckpt_every == 0 and step != total
            if saved_now:
                self._checkpoint(s)
            stop = self._stop_signal is not None or (
                self.stop_after_steps is not None and step >= self.stop_after_steps)
            if acc.num_processes > 1:  # a signal may reach one process only
                flag = torch.tensor(float(stop), device=acc.device)
                stop = bool(acc.reduce(flag, "sum").item() > 0)
            if stop or stopped_by:
                stopped_by = stopped_by or self._stop_signal or "stop_after_steps"
                if not saved_now:
                    self._checkpoint(s)
                break
        bar.close()
        return self._finish(s, stopped_by)

    def _train_step(self, s: _Session, window: dict[str, Any]) -> torch.Tensor:
        """One optimizer step (with accumulation and the NaN guard); returns the grad norm."""
        tcfg, acc, state = s.cfg.training, s.acc, s.state
        flow = s.cfg.model.transformer.flow
        aux_weight = flow.aux_loss_weight if flow.enabled else 0.0
        accum = tcfg.gradient_accumulation_steps
        step = state["step"]
        for micro in range(accum):
            sampler = s.curriculum_sampler if tcfg.curriculum.covers(step) else s.sampler
            batch = sampler.batch(step * accum + micro, tcfg.batch_size, acc.process_index)
            with nullcontext() if micro == accum - 1 else acc.no_sync(s.model):
                pred, snr_estimate = s.model(batch.points, batch.mask, batch.snr_db,
                                             return_aux=True)
                loss = compute_loss(tcfg.loss, pred, batch)
                # Always include the estimate (even at weight 0): the estimator would otherwise
                # get no gradient, and DDP rejects unused parameters.
                if snr_estimate is not None:
                    error = (snr_estimate.float() - batch.snr_db) / flow.snr_scale_db
                    loss = loss + aux_weight * error.square().mean()
                if self.loss_hook is not None:
                    loss = self.loss_hook(step, loss)
                acc.backward(loss / accum)
            window["loss"] += loss.detach() / accum
            # Counted without a host sync when every set has the same N (the default).
            window["points"] += (batch.points.shape[0] * batch.points.shape[1]
                                 if batch.mask is None else batch.mask.sum()) * acc.num_processes

        # NaN/inf guard: gradients are already all-reduced, so every process agrees.
        if tcfg.gradient_clip_norm is not None:
            grad_norm = acc.clip_grad_norm_(s.model.parameters(), tcfg.gradient_clip_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in s.model.parameters() if p.grad is not None]))
        if torch.isfinite(grad_norm):
            s.optimizer.step()
            state["nonfinite_in_a_row"] = 0
            if s.ema is not None:
                s.ema.update(s.raw_model)
        else:
            state["nonfinite_in_a_row"] += 1
            state["skipped_steps"] += 1
            log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                        step + 1, state["nonfinite_in_a_row"])
            if state["nonfinite_in_a_row"] >= tcfg.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"loss was NaN/inf for {state['nonfinite_in_a_row']} steps in a row "
                    f"(training.max_nonfinite_steps); no checkpoint was written for them. "
                    f"Lower training.optimizer.lr or set training.gradient_clip_norm.")
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        state["step"] = step + 1
        state["epoch"] = state["step"] // tcfg.steps_per_epoch
        window["steps"] += 1
        return grad_norm

    def _log_training(self, s: _Session, window: dict[str, Any], grad_norm: torch.Tensor,
                      bar: tqdm) -> None:
        step = s.state["step"]
        mean_loss = s.acc.reduce(window["loss"], "mean").item() / window["steps"]
        elapsed = max(time.time() - window["start"], 1e-9)
        scalars = {"train/loss": mean_loss, "train/lr": s.scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm),
                   "train/points_per_s": float(window["points"]) / elapsed,
                   "train/epoch": step / s.cfg.training.steps_per_epoch}
        curriculum = s.cfg.training.curriculum
        if curriculum.steps:  # 1 while steps draw the curriculum's set sizes
            scalars["train/curriculum"] = float(curriculum.covers(step - 1))
        s.trackers.log(scalars, step)
        bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{scalars['train/lr']:.2e}",
                        pts_s=f"{scalars['train/points_per_s']:.3g}")
        if s.main and bar.disable:  # no bar (no terminal, or logging.progress_bar off): a line
            total = s.cfg.training.total_steps
            done = step - window["step0"]
            eta = ((time.time() - window["t0"]) / done * (total - step)) if done else None
            log.info("%s", progress_line(step, total, mean_loss, scalars["train/lr"],
                                         scalars["train/points_per_s"], eta))
        log.debug("step %d %s", step, scalars)
        window["loss"].zero_()
        window.update(points=0, steps=0, start=time.time())

    def _finish(self, s: _Session, stopped_by: str | None) -> dict[str, Any]:
        """Final validation, checkpoint, final/ and plots (or a note on how to resume)."""
        state, total = s.state, s.cfg.training.total_steps
        summary: dict[str, Any] = {"run_dir": str(s.run_dir), "steps": state["step"],
                                   "total_steps": total, "parameters": s.num_params,
                                   "skipped_steps": state["skipped_steps"]}
        if stopped_by:
            summary["stopped_by"] = stopped_by
        if state["step"] < total and stopped_by != "early stopping":
            log.info("stopped at step %d by %s; continue with --resume latest (or --resume %s)",
                     state["step"], stopped_by, s.run_dir)
            return summary
        results, _ = self._validate(s, state["step"])
        self._checkpoint(s)
        self._export(s, s.run_dir / "final", {"step": state["step"]})
        vis = s.cfg.validation.visualization
        if s.main and vis.enabled and not s.sharded:  # after the results are safely saved
            images = draw_plots(s.cfg.validation, s.run_dir / "plots",
                                self._eval_model(s), s.bank[0], results,
                                s.run_dir / "metrics.jsonl", s.cfg.device.seed)
            s.trackers.log_images(images, state["step"])
        summary.update(results.to_json())
        if s.acc.num_processes > 1 and not s.sharded:
            summary["ranks_in_sync"] = self._ranks_in_sync(s)
        summary["best"] = {"step": state["best_step"],
                           "metric": s.cfg.training.early_stopping.metric,
                           "value": state["best_metric"]}
        return summary

    @staticmethod
    def _ranks_in_sync(s: _Session) -> bool:
        """Whether every process ended with the same weights (a DDP sanity check)."""
        fingerprint = torch.stack([p.detach().double().sum() for p in s.raw_model.parameters()])
        everyone = s.acc.gather(fingerprint.unsqueeze(0))  # [processes, params]
        in_sync = bool((everyone == everyone[0]).all())
        if not in_sync:
            log.warning("processes ended with different weights; the run is not trustworthy")
        return in_sync

    # --- (6) validation, (7) tracking -------------------------------------------------------

    @staticmethod
    def _eval_model(s: _Session) -> torch.nn.Module:
        """The weights to evaluate and export: the EMA average when enabled."""
        if s.sharded:
            return s.model
        if s.ema is None:
            return s.raw_model
        averaged = copy.deepcopy(s.raw_model)
        s.ema.copy_to(averaged)
        return averaged

    def _validate(self, s: _Session, step: int) -> tuple[Results, bool]:
        """Validate on the bank, log, keep best/. Returns (results, whether early stopping
        says stop)."""
        cfg, acc, state = s.cfg, s.acc, s.state
        eval_model = self._eval_model(s)
        # Baselines do not depend on the model: they are scored once on the fixed bank.
        sums = validation_sums(eval_model, s.bank, cfg.validation, cfg.data, cfg.device.seed,
                               s.baseline_cache).to(acc.device)
        if not s.sharded:  # each process scored its own share of the bank
            sums = acc.reduce(sums, "sum")
        results = summarise(sums, layout(cfg.validation, cfg.data))
        s.trackers.log({f"val/{k}": v for k, v in results.flat().items()}, step)
        log.info("%s", validation_line(step, results))  # every key: metrics.jsonl

        es = cfg.training.early_stopping
        if es.metric not in results.model:
            raise ConfigError([f"early_stopping.metric {es.metric!r} is not computed; choose one "
                               f"of {sorted(results.model)} @ $.training.early_stopping.metric"])
        value = results.model[es.metric]
        if state["best_metric"] is None or value < state["best_metric"] - es.min_delta:
            state.update(best_metric=value, best_step=step, evals_without_improvement=0)
            if cfg.training.checkpointing.save_best:
                self._export(s, s.run_dir / "best", {"step": step, es.metric: value}, eval_model)
        else:
            state["evals_without_improvement"] += 1
        return results, es.enabled and state["evals_without_improvement"] >= es.patience

    def _export(self, s: _Session, folder: Path, info: dict[str, Any],
                eval_model: torch.nn.Module | None = None) -> None:
        """Write ``folder`` (model.safetensors + config.json) from the main process."""
        if s.sharded:  # gathering a sharded state dict is collective: every process joins
            state_dict = s.acc.get_state_dict(s.model)
            if s.main:
                export_model(s.raw_model, s.cfg, folder, info, state_dict)
            return
        if s.main:
            export_model(eval_model or self._eval_model(s), s.cfg, folder, info)

    # --- (8) checkpoints --------------------------------------------------------------------

    def _checkpoint(self, s: _Session) -> None:
        if not all(torch.isfinite(p).all() for p in s.raw_model.parameters()):
            raise TrainingDiverged("model weights are not finite; refusing to checkpoint them")
        acc, step = s.acc, s.state["step"]
        acc.wait_for_everyone()
        acc.save_state(str(temporary_checkpoint_dir(s.run_dir, step)))
        acc.wait_for_everyone()
        if acc.is_main_process:
            s.cfg.save(temporary_checkpoint_dir(s.run_dir, step) / "config.json")
            path = finish_checkpoint(s.run_dir, step, s.state,
                                     s.cfg.training.checkpointing.keep_last)
            log.info("checkpoint: %s", path)
        acc.wait_for_everyone()
