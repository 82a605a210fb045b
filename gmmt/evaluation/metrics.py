"""Per-set metrics of predicted centres, in float64, mask-aware.

Shape legend: ``b`` sets, ``n`` points, ``d`` dims.
"""

import torch


def centre_mse_per_set(pred: torch.Tensor, target: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per coordinate over each set's real points, [b] float64."""
    err = (pred.double() - target.double()).square().sum(-1) / pred.shape[-1]  # [b, n]
    if mask is None:
        return err.mean(-1)
    m = mask.double()
    return (err * m).sum(-1) / m.sum(-1).clamp_min(1.0)
