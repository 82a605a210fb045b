"""AdamW with decay / no-decay parameter groups, learning-rate schedules, and a weight EMA."""

import math

import torch
from torch import nn

from gmmt.config.training import OptimizerConfig, SchedulerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices decay; biases, norm gains and other vectors do not."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW at the configured peak learning rate."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=config.betas, eps=config.eps)


def lr_factor(step: int, config: SchedulerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (linear warmup, then decay)."""
    warmup = config.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.type == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = config.min_lr_ratio
    if config.type == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (never once per process)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, total_steps))


class WeightEMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), 1.0 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        state = model.state_dict()
        for key, value in self.shadow.items():
            state[key].copy_(value.to(state[key].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
