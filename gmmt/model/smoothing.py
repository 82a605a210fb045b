"""Output smoothing: average each predicted centre with the predictions near it.

A transformer's attention averages points with weights that are never exactly equal inside a
cluster, so its predicted centres jitter from point to point within a cluster, and each keeps
a share of its own point's noise. Output smoothing replaces prediction c_i by a kernel average
over the set's predictions, which collapse together within a cluster:

    out_i = sum_j w_ij c_j,    w_ij = softmax_j(-|c_i - c_j|^2 / (2 h^2 s^2))

with ``s^2`` the set's mean squared residual |z - c|^2 per coordinate (a data-only noise
scale) and ``h`` a learned bandwidth. On a well separated cluster the weights are uniform over
its points and the jitter goes; where predictions legitimately vary (overlapping clusters) they
vary smoothly, and averaging near neighbours leaves them almost unchanged. Training widens h
from its starting value.

Shape legend: b sets, n points, d dims. ``mask`` is [b, n] bool or ``None``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gmmt.model.attention import key_padding_mask
from gmmt.model.sets import masked_mean

# Smallest residual variance we divide by (normalised units, where a set's variance is 1).
MIN_RESIDUAL_VAR = 1e-6


class OutputSmoothing(nn.Module):
    """Kernel smoothing of the predictions over each other (see the module docstring), with a
    learned bandwidth that starts at ``initial_bandwidth`` (units of the residual scale s)."""

    def __init__(self, initial_bandwidth: float) -> None:
        super().__init__()
        if not initial_bandwidth > 0:
            raise ValueError(f"initial_bandwidth must be > 0, got {initial_bandwidth}")
        self.log_bandwidth = nn.Parameter(torch.tensor(math.log(initial_bandwidth)))

    def forward(self, z: torch.Tensor, centres: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Smoothed centres [b, n, d] from points z [b, n, d] (for the noise scale) and
        predicted centres [b, n, d]."""
        # The logits reach |c|^2 / (h s)^2 ~ 10^3-10^5, which bf16 or fp16 would scramble.
        dtype = torch.promote_types(centres.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            c = centres.to(dtype)
            residual = (z.to(dtype) - c).square().mean(dim=-1, keepdim=True)  # [b, n, 1]
            # The scale is a property of the set, not something to fit the centres towards.
            noise_var = masked_mean(residual, mask).detach().clamp_min(MIN_RESIDUAL_VAR)
            precision = 1.0 / (torch.exp(2 * self.log_bandwidth) * noise_var)  # [b, 1, 1]
            # -|c_i - c_j|^2 / 2 up to a per-query constant, as one dot product:
            # [c_i, 1] . [c_j, -|c_j|^2 / 2] = c_i . c_j - |c_j|^2 / 2.
            query = torch.cat([c, torch.ones_like(c[..., :1])], dim=-1) * precision
            key = torch.cat([c, -0.5 * c.square().sum(dim=-1, keepdim=True)], dim=-1)
            attn_mask = None if mask is None else key_padding_mask(mask)
            smoothed = F.scaled_dot_product_attention(
                query.unsqueeze(1), key.unsqueeze(1), c.unsqueeze(1), attn_mask=attn_mask,
                scale=1.0).squeeze(1)
            return smoothed.to(centres.dtype)

    def extra_repr(self) -> str:
        return f"bandwidth={math.exp(float(self.log_bandwidth.detach())):.3g}"
