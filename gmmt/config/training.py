"""Training configuration: optimisation, schedule, loss, checkpoints, early stopping."""

from typing import ClassVar, Literal

from gmmt.config.data import DistributionSpec, count_problems
from gmmt.config.fields import (
    at_most,
    config_class,
    each_item,
    less_than,
    non_negative,
    positive,
    setting,
)


@config_class
class OptimizerConfig:
    """AdamW; weight decay applies to weight matrices only (not biases or norm weights)."""

    type: Literal["adamw"] = setting("adamw", "optimizer")
    lr: float = setting(1e-3, "peak learning rate", positive)
    weight_decay: float = setting(0.01, "decoupled weight decay on matrices", non_negative)
    betas: tuple[float, float] = setting(
        (0.9, 0.999), "Adam betas", each_item(non_negative, less_than(1)))
    eps: float = setting(1e-8, "Adam epsilon", positive)


@config_class
class SchedulerConfig:
    """Learning-rate schedule, counted in optimizer steps (independent of the process count)."""

    type: Literal["cosine", "linear", "constant"] = setting(
        "cosine", "decay after warmup: cosine or linear to min_lr_ratio * lr, or constant")
    warmup_steps: int = setting(0, "linear warmup from 0 over this many optimizer steps",
                                non_negative)
    min_lr_ratio: float = setting(0.0, "final lr as a fraction of the peak", non_negative,
                                  at_most(1))


@config_class
class LossConfig:
    """Training objective on the predicted centres."""

    type: Literal["mse", "energy", "wasserstein"] = setting(
        "mse", "mse: each prediction against its point's target (see target); energy / "
        "wasserstein: predicted cloud vs the weighted true centres")
    target: Literal["centre", "labelled_posterior_mean"] = setting(
        "centre", "mse only: centre = each point's true centre; labelled_posterior_mean = its "
        "posterior mean given the other points' labels, the weights and sigma (both have the "
        "same minimiser; the second carries less noise)")
    normalization: Literal["none", "noise_var", "snr_power", "log"] = setting(
        "noise_var", "per-set scaling: none; noise_var: / sigma^2; snr_power: / signal_var * "
        "snr^p; log: log(eps + loss / sigma^2)")
    snr_power_exponent: float = setting(
        0.5, "p of snr_power (0 = divide by signal variance, 1 = same as noise_var)")
    log_epsilon: float = setting(1e-4, "eps of the log normalization", positive)
    sinkhorn_epsilon: float = setting(0.05, "entropic regularisation (relative to sigma^2)",
                                      positive)
    sinkhorn_iterations: int = setting(50, "Sinkhorn iterations", positive)

    def _problems(self) -> list[tuple[str, str]]:
        if self.target != "centre" and self.type != "mse":
            return [("target", f"{self.target!r} is only for the mse loss (type is "
                     f"{self.type!r}); use 'centre'")]
        return []


@config_class
class CheckpointConfig:
    """When and how many training checkpoints to keep."""

    every_n_steps: int = setting(
        0, "save a resumable checkpoint every n optimizer steps (0: only at the end)",
        non_negative)
    keep_last: int = setting(3, "keep this many step checkpoints (plus best/ and final/)",
                             positive)
    save_best: bool = setting(True, "keep best/ by validation metric")


@config_class
class EMAConfig:
    """Exponential moving average of the weights, used for validation and saved models."""

    enabled: bool = setting(False, "keep an EMA copy of the weights")
    decay: float = setting(0.999, "EMA decay per optimizer step", positive, less_than(1))


@config_class
class EarlyStoppingConfig:
    """Stop when the validation metric stops improving."""

    enabled: bool = setting(False, "stop early")
    patience: int = setting(5, "validations without improvement before stopping", positive)
    min_delta: float = setting(0.0, "smallest decrease that counts as improvement", non_negative)
    metric: str = setting("mse", "validation metric to watch (lower is better)")


@config_class
class CurriculumConfig:
    """Smaller sets first: the first ``steps`` steps draw N from their own distribution.

    Those optimizer steps draw each batch's N from ``sample_count_distribution`` instead of
    ``data.sample_count_distribution``. Attention costs N^2 while the model is the same function
    of every N, so early steps on small sets buy more updates per second; the steps after them
    adapt it to the sets it is judged on. Validation always uses the data prior. Like the epoch
    count, it may change on resume (the change is printed); steps already run stay as drawn.
    """

    steps: int = setting(0, "optimizer steps drawn from the distribution below (0: off)",
                         non_negative)
    sample_count_distribution: DistributionSpec = setting(
        doc="number of points N during those steps (integer, >= 1)",
        factory=lambda: DistributionSpec(type="uniform", min=50, max=150))

    def _problems(self) -> list[tuple[str, str]]:
        return [("sample_count_distribution", message)
                for message in count_problems(self.sample_count_distribution, 1)]

    def covers(self, step_index: int) -> bool:
        """Whether optimizer step ``step_index`` (0-based) draws the curriculum's set sizes."""
        return step_index < self.steps


@config_class
class TrainingConfig:
    """The training loop. Data is drawn fresh each step; an epoch is steps_per_epoch steps."""

    num_epochs: int = setting(1, "number of epochs", positive)
    steps_per_epoch: int = setting(100, "optimizer steps per epoch", positive)
    batch_size: int = setting(32, "sets per micro-batch per process", positive)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", positive)
    gradient_clip_norm: float | None = setting(1.0, "clip the global grad norm (null: off)",
                                               positive)
    max_nonfinite_steps: int = setting(
        10, "skip steps with a NaN/inf loss; stop with an error after this many in a row",
        positive)
    compile: bool = setting(False, "torch.compile the model (slower than eager on CPU)")
    max_cpu_hours: float | None = setting(
        2.0, "on a CPU, the first steps are timed and a run projected to train longer than this "
        "stops before it starts, with advice (null: never; --allow-slow overrides)", positive)
    optimizer: OptimizerConfig = setting(doc="optimizer", factory=OptimizerConfig)
    scheduler: SchedulerConfig = setting(doc="learning-rate schedule", factory=SchedulerConfig)
    loss: LossConfig = setting(doc="objective", factory=LossConfig)
    curriculum: CurriculumConfig = setting(doc="smaller sets first", factory=CurriculumConfig)
    checkpointing: CheckpointConfig = setting(doc="checkpoints", factory=CheckpointConfig)
    ema: EMAConfig = setting(doc="weight EMA", factory=EMAConfig)
    early_stopping: EarlyStoppingConfig = setting(doc="early stopping",
                                                  factory=EarlyStoppingConfig)

    # Names users reach for in JSON that live elsewhere (used for "did you mean" hints).
    KEY_ALIASES: ClassVar[dict[str, str]] = {"learning_rate": "optimizer.lr", "lr": "optimizer.lr",
                                             "epochs": "num_epochs", "warmup_steps":
                                             "scheduler.warmup_steps"}

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self.num_epochs * self.steps_per_epoch

    @property
    def learning_rate(self) -> float:
        """Alias of ``optimizer.lr``."""
        return self.optimizer.lr

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.optimizer.lr = value

    def _problems(self) -> list[tuple[str, str]]:
        out = []
        if self.scheduler.warmup_steps > self.total_steps:
            out.append(("scheduler.warmup_steps", f"{self.scheduler.warmup_steps} exceeds the "
                        f"run's {self.total_steps} optimizer steps"))
        if self.curriculum.steps > self.total_steps:
            out.append(("curriculum.steps", f"{self.curriculum.steps} exceeds the run's "
                        f"{self.total_steps} optimizer steps; lower it (0 turns it off)"))
        return out
