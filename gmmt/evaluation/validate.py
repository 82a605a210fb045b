"""Validation of a model on a fixed bank of sets: model metrics and cheap baselines.

Returns sums and counts so that callers can reduce across processes before averaging.
"""

import torch
from torch import nn

from gmmt.config.validation import ValidationConfig
from gmmt.data.batch import GMMBatch
from gmmt.evaluation.metrics import centre_mse_per_set

# Baselines this module computes; the others come from gmmt.evaluation.baselines when present.
CHEAP_BASELINES = ("identity",)


@torch.no_grad()
def validation_sums(model: nn.Module, batches: list[GMMBatch],
                    config: ValidationConfig) -> dict[str, torch.Tensor]:
    """Per-metric sums over every set of ``batches`` plus ``"count"`` (float64 scalars)."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, per_set: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + per_set.double().sum()

    try:
        for batch in batches:
            pred = model(batch.points, batch.mask, batch.snr_db)
            target = batch.target
            sigma2 = batch.sigma.double().square()
            mse = centre_mse_per_set(pred, target, batch.mask)
            add("count", torch.ones_like(mse))
            add("mse", mse)
            add("mse_over_noise", mse / sigma2)
            if "identity" in config.baselines:
                identity = centre_mse_per_set(batch.points, target, batch.mask)
                add("baselines.identity.mse", identity)
                add("baselines.identity.mse_over_noise", identity / sigma2)
    finally:
        model.train(was_training)
    return sums


def averages(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    count = float(sums["count"])
    return {k: float(v) / count for k, v in sums.items() if k != "count"}


def metric_keys(config: ValidationConfig) -> list[str]:
    """The keys :func:`validation_sums` fills, in a fixed order (for cross-process reduction)."""
    keys = ["count", "mse", "mse_over_noise"]
    if "identity" in config.baselines:
        keys += ["baselines.identity.mse", "baselines.identity.mse_over_noise"]
    return keys
