"""ExperimentManager: one experiment from config to summary, on Hugging Face Accelerate.

The eight steps: (1) run folder, (2) data streams, (3) model, (4) optimizer, schedule and loss,
(5) the loop, (6) validation, (7) metrics and trackers, (8) checkpoints. Batches are a pure
function of (seed, stream, rank, step), so a resumed run needs no loader state.
"""

import copy
import errno
import json
import logging
import math
import pickle
import shutil
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
from gmmt.saved_model import (
    DamagedFileError,
    RunFileError,
    export_model,
    first_line,
    write_json_atomic,
)
from gmmt.training.checkpoint import (
    checkpoint_ranks,
    finish_checkpoint,
    load_ema,
    load_rank_state,
    process_count_problem,
    read_trainer_state,
    save_rank_state,
    step_checkpoints,
    temporary_checkpoint_dir,
)
from gmmt.training.losses import compute_loss, count_loss
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
            "wandb_run_id": None, "train_time_s": 0.0, "finished": None}


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync)."""
    flags = [torch.isfinite(v).all() for v in model.state_dict().values()
             if v.dtype.is_floating_point]
    return bool(torch.stack(flags).all()) if flags else True


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
        allow_inexact_resume: continue a checkpoint written by another number of processes
            (with a warning that the continuation is no longer bit-exact) instead of refusing.
    """

    def __init__(self, config: ExperimentConfig, resume: str | Path | None = None,
                 stop_after_steps: int | None = None,
                 loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 allow_inexact_resume: bool = False) -> None:
        config.validate()
        self.allow_inexact_resume = allow_inexact_resume
        # A boolean mixed_precision becomes the string it means here, so that Accelerate, the
        # saved config.json and a resume's comparison all see what actually ran.
        config.device.mixed_precision = resolve_mixed_precision(config.device)
        self.config = config
        self.resume = resume
        self.stop_after_steps = stop_after_steps
        self.loss_hook = loss_hook
        self.run_dir: Path | None = None
        self._stop_signal: str | None = None
        self._segment_start = time.time()  # reset when the loop starts

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
            done = self._already_complete(checkpoint)
            if done is not None:
                return done
        acc = build_accelerator(cfg)
        if checkpoint is not None:  # refused before anything is written
            self._check_process_count(checkpoint, acc.num_processes)
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
        raw_model = build_model(cfg.model, cfg.data.dim, cfg.data.max_clusters).to(acc.device)
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
        # The schedule and the EMA are saved by gmmt (JSON, safetensors), not registered with
        # Accelerate, which would save them as pickles and load them with full unpickling.
        state = initial_state()
        if checkpoint is not None:
            state.update(self._restore(acc, checkpoint, raw_model, scheduler, ema))
        main = acc.is_main_process
        trackers = Trackers(run_dir if main else None, cfg if main else None,
                            state["wandb_run_id"])
        state["wandb_run_id"] = trackers.wandb_run_id
        session = _Session(cfg, acc, run_dir, model, raw_model, optimizer, scheduler, ema,
                           sampler, curriculum_sampler, my_bank, trackers, state, num_params,
                           sharded)

        previous = signal.signal(signal.SIGTERM, self._on_signal)
        start = self._segment_start = time.time()
        try:
            summary = self._loop(session)
        except OSError as err:  # a write outside a checkpoint (best/, final/, metrics.jsonl)
            raise self._write_error(session, "to the run folder", err) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            trackers.finish()
        # Every segment of a resumed run counts: the earlier ones come with the trainer state.
        summary["train_time_s"] = round(state["train_time_s"] + time.time() - start, 3)
        if main:
            try:
                write_json_atomic(run_dir / "summary.json", summary)
            except OSError as err:
                raise self._write_error(session, "summary.json", err) from None
            log.debug("summary: %s", json.dumps(summary))
            log.info("%s", final_line(summary))
        acc.wait_for_everyone()
        return summary

    # --- resume --------------------------------------------------------------------------

    def _already_complete(self, checkpoint: Path) -> dict[str, Any] | None:
        """The saved summary when ``checkpoint`` ends a finished run this config would not
        extend; resuming it then changes nothing (no re-validation, no rewritten files)."""
        state = read_trainer_state(checkpoint)
        total = self.config.training.total_steps
        finished = state.get("finished")
        if not finished or (state["step"] < total and finished != "early stopping"):
            return None
        run_dir = checkpoint.parent.parent
        self.run_dir = run_dir
        setup_logging(None, self.config, True)  # console only: train.log is left untouched
        log.warning("%s is complete (step %d of %d, %s); nothing to do and nothing was "
                    "changed. To train longer, raise training.num_epochs.", run_dir,
                    state["step"], total, finished)
        try:
            return json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {"run_dir": str(run_dir), "steps": state["step"], "total_steps": total}

    def _check_process_count(self, checkpoint: Path, num_processes: int) -> None:
        """Refuse (before anything is written) a checkpoint of another process count."""
        problem = process_count_problem(checkpoint, num_processes)
        if problem and not self.allow_inexact_resume:
            raise RunFileError(f"cannot resume exactly: {problem}. Resume with the same number "
                               f"of processes, or pass --allow-inexact-resume to continue "
                               f"anyway (not bit-exact)")

    def _restore(self, acc: Accelerator, checkpoint: Path, raw_model: torch.nn.Module,
                 scheduler: Any, ema: WeightEMA | None) -> dict[str, Any]:
        """Load a verified checkpoint into the prepared objects; return its trainer state.

        Accelerate loads the model (safetensors) and optimizer (``weights_only=True``); gmmt
        loads the schedule (JSON), the EMA weights and the RNG state (safetensors).
        """
        saved = read_trainer_state(checkpoint)
        try:  # after prepare(), or it silently does nothing
            acc.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        except Exception as err:  # a forged file that passed the manifest, or another model
            why = ("holds objects other than tensors (refused: unpickling them could run code)"
                   if isinstance(err, pickle.UnpicklingError)
                   else f"cannot be loaded ({first_line(err)})")
            raise DamagedFileError(_blame(err, checkpoint), why) from None
        try:
            scheduler.load_state_dict(saved.pop("scheduler"))
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedFileError(checkpoint / "trainer_state.json",
                                   f"bad schedule state ({first_line(err)})") from None
        if ema is not None and not load_ema(checkpoint, ema.shadow):
            log.warning("the checkpoint has no EMA weights (EMA switched on at resume): the "
                        "average starts from the resumed weights")
            ema.shadow = WeightEMA(raw_model, ema.decay).shadow
        problem = process_count_problem(checkpoint, acc.num_processes)
        if problem:  # only reached with allow_inexact_resume
            log.warning("%s; continuing anyway (--allow-inexact-resume): this continuation is "
                        "no longer bit-exact", problem)
        if not load_rank_state(checkpoint, acc.process_index):
            log.warning("%s has no RNG state for rank %d (it has ranks %s): this process's "
                        "generators continue from the seed", checkpoint, acc.process_index,
                        checkpoint_ranks(checkpoint))
        saved.pop("num_processes", None)
        saved["finished"] = None  # reached only when this config extends the run
        return saved

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
            signum = signal.Signals[self._stop_signal].value if self._stop_signal else 0
            after = self.stop_after_steps is not None and step >= self.stop_after_steps
            if acc.num_processes > 1:  # a signal may reach one process only: share the reason
                flags = torch.tensor([[float(signum), float(after)]], device=acc.device)
                everyone = acc.gather(flags)  # [processes, 2]
                signum = int(everyone[:, 0].max().item())
                after = bool(everyone[:, 1].max().item() > 0)
            if signum or after or stopped_by:
                stopped_by = stopped_by or (signal.Signals(signum).name if signum
                                            else "stop_after_steps")
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
        count_weight = s.cfg.model.count_head.loss_weight
        accum = tcfg.gradient_accumulation_steps
        step = state["step"]
        for micro in range(accum):
            sampler = s.curriculum_sampler if tcfg.curriculum.covers(step) else s.sampler
            batch = sampler.batch(step * accum + micro, tcfg.batch_size, acc.process_index)
            with nullcontext() if micro == accum - 1 else acc.no_sync(s.model):
                pred, aux = s.model(batch.points, batch.mask, batch.snr_db, return_aux=True)
                loss = compute_loss(tcfg.loss, pred, batch)
                # Always include the heads' losses (even at weight 0): a head would otherwise
                # get no gradient, and DDP rejects unused parameters.
                if aux.snr_db is not None:
                    error = (aux.snr_db.float() - batch.snr_db) / flow.snr_scale_db
                    loss = loss + aux_weight * error.square().mean()
                if aux.count_logits is not None:
                    loss = loss + count_weight * count_loss(aux.count_logits, batch.k)
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
            # A finite gradient can still overflow the update (a huge weight decay or lr);
            # such weights cannot be skipped back, so stop before anything saves them.
            if not s.sharded and not weights_finite(s.raw_model):
                opt = tcfg.optimizer
                raise TrainingDiverged(self._diverged(
                    s, f"step {step + 1} made the weights non-finite although the loss and "
                       f"gradient were finite: the update overflowed (training.optimizer.lr="
                       f"{opt.lr:g}, weight_decay={opt.weight_decay:g})", advise=False))
            if s.ema is not None:
                s.ema.update(s.raw_model)
        else:
            state["nonfinite_in_a_row"] += 1
            state["skipped_steps"] += 1
            log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                        step + 1, state["nonfinite_in_a_row"])
            if state["nonfinite_in_a_row"] >= tcfg.max_nonfinite_steps:
                raise TrainingDiverged(self._diverged(
                    s, f"loss was NaN/inf for {state['nonfinite_in_a_row']} steps in a row "
                       f"(training.max_nonfinite_steps)"))
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
        metric = s.cfg.training.early_stopping.metric
        if not math.isfinite(results.model[metric]):  # e.g. data too large for float32
            raise TrainingDiverged(self._diverged(
                s, f"the final validation {metric} is {results.model[metric]} after "
                   f"{state['skipped_steps']} skipped step(s)"))
        # Marks the last checkpoint: resuming it again says "complete" and changes nothing.
        state["finished"] = stopped_by or "total_steps"
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
        refinement = cfg.model.refinement
        sums = validation_sums(eval_model, s.bank, cfg.validation, cfg.data, cfg.device.seed,
                               s.baseline_cache, refinement).to(acc.device)
        if not s.sharded:  # each process scored its own share of the bank
            sums = acc.reduce(sums, "sum")
        results = summarise(sums, layout(cfg.validation, cfg.data, refinement.enabled))
        s.trackers.log({f"val/{k}": v for k, v in results.flat().items()}, step)
        log.info("%s", validation_line(step, results))  # every key: metrics.jsonl

        es = cfg.training.early_stopping
        if es.metric not in results.model:
            raise ConfigError([f"early_stopping.metric {es.metric!r} is not computed; choose one "
                               f"of {sorted(results.model)} @ $.training.early_stopping.metric"])
        value = results.model[es.metric]
        # best/ never receives a non-finite metric or weights: it is what users load.
        finite = math.isfinite(value) and (s.sharded or weights_finite(eval_model))
        if not finite:
            state["evals_without_improvement"] += 1
            log.warning("step %d: validation %s is %s or the weights are not finite; best/ is "
                        "left as it was (%s)", step, es.metric, value,
                        f"step {state['best_step']}" if state["best_step"] else "not written")
        elif state["best_metric"] is None or value < state["best_metric"] - es.min_delta:
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
        if not s.sharded and not weights_finite(s.raw_model):
            raise TrainingDiverged(self._diverged(s, "the model weights are not finite"))
        acc, step = s.acc, s.state["step"]
        tmp = temporary_checkpoint_dir(s.run_dir, step)
        try:
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            save_rank_state(tmp, acc.process_index)
            acc.wait_for_everyone()
            if acc.is_main_process:
                s.cfg.save(tmp / "config.json")
                path = finish_checkpoint(s.run_dir, step, self._trainer_state(s),
                                         s.cfg.training.checkpointing.keep_last,
                                         s.ema.shadow if s.ema is not None else None)
                log.info("checkpoint: %s", path)
        except (OSError, RuntimeError) as err:
            if not isinstance(err, OSError) and not _is_write_failure(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the temporary is never a checkpoint
            raise self._write_error(s, f"checkpoint step_{step}", err) from None
        acc.wait_for_everyone()

    def _trainer_state(self, s: _Session) -> dict[str, Any]:
        """What trainer_state.json holds: the counters, the schedule, the process count (part
        of the batch layout) and the training time of every segment so far."""
        return {**s.state, "scheduler": s.scheduler.state_dict(),
                "num_processes": s.acc.num_processes,
                "train_time_s": round(s.state["train_time_s"] + time.time()
                                      - self._segment_start, 3)}

    @staticmethod
    def _write_error(s: _Session, what: str, err: BaseException) -> RunFileError:
        """One line for a failed write (full disk, lost permissions): what failed, and that
        the checkpoints written before are intact (each was complete before its rename)."""
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            reason = "the disk is full"
        else:
            reason = first_line(err) if not isinstance(err, OSError) else (err.strerror or
                                                                           first_line(err))
        done = step_checkpoints(s.run_dir)
        intact = (f"earlier checkpoints are intact (newest: {done[-1][1]}); free space and "
                  f"continue with --resume latest" if done else "no earlier checkpoint exists")
        return RunFileError(f"could not write {what} in {s.run_dir}: {reason}; {intact}")

    @staticmethod
    def _diverged(s: _Session, what: str, advise: bool = True) -> str:
        """The exit-3 message: what went wrong, what was and was not written, what to try."""
        state = s.state
        done = step_checkpoints(s.run_dir)
        written = [f"the last checkpoint is {done[-1][1].name} (finite weights)" if done
                   else "no checkpoint was written"]
        written.append(f"best/ holds step {state['best_step']}" if state["best_step"]
                       and s.cfg.training.checkpointing.save_best else "best/ was not written")
        written.append("final/ and summary.json were not written; nothing non-finite was saved")
        tips = []
        if advise:
            tips.append("lower training.optimizer.lr")
            clip = s.cfg.training.gradient_clip_norm
            tips.append("set training.gradient_clip_norm" if clip is None
                        else f"gradient clipping (norm {clip:g}) is already on, so check the "
                             f"data scale and training.optimizer settings")
        return f"{what}; " + "; ".join(written) + ("." if not tips else
                                                    ". Try: " + "; ".join(tips) + ".")


def _is_write_failure(err: BaseException) -> bool:
    """torch.save reports a full disk as a RuntimeError, not an OSError."""
    text = str(err).lower()
    return "write" in text or "space" in text


def _blame(err: BaseException, checkpoint: Path) -> Path:
    """The file Accelerate was loading when ``err`` was raised (from its frames' locals)."""
    tb, found = err.__traceback__, None
    while tb is not None:
        names = tb.tb_frame.f_locals
        for key in ("input_optimizer_file", "input_model_file"):
            if key in names:
                found = Path(names[key])
                break
        tb = tb.tb_next
    return found or checkpoint
