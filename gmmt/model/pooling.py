"""Centre pooling: replace each predicted centre by an average of the input points around it.

A transformer's attention averages points with weights that are never exactly equal inside a
cluster, so its centres carry a share of each point's noise that a cluster's sample mean would
average away. Pooling looks for the points whose *predicted* centres lie near a point's own
(where a cluster's predictions collapse together) and averages their *inputs*:

    pooled_i = sum_j w_ij z_j,  w_ij = softmax_j(-|c_i - c_j|^2 / (2 h^2 s^2))

with ``s^2`` the set's mean squared residual |z - c|^2 per coordinate (a data-only noise
scale), and ``h`` a learned bandwidth. On a well separated cluster the weights are uniform
over its points and the pooled value is its sample mean; where clusters overlap it blurs, so
a learned per-point gate g_i in (0, 1) mixes it in: out_i = c_i + g_i (pooled_i - c_i).

Shape legend: b sets, n points, d dims, D hidden width. ``mask`` is [b, n] bool or ``None``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gmmt.model.attention import key_padding_mask
from gmmt.model.sets import masked_mean

# Smallest residual variance we divide by (normalised units, where a set's variance is 1).
MIN_RESIDUAL_VAR = 1e-6


class CentrePooling(nn.Module):
    """The pooling readout above; starts with bandwidth h = 1 and its gates nearly shut
    (0.12), so that training first shapes the centres it pools around."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.log_bandwidth = nn.Parameter(torch.zeros(()))
        self.gate = nn.Linear(hidden_dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)

    def forward(self, z: torch.Tensor, centres: torch.Tensor, features: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled centres [b, n, d] from points z [b, n, d], predicted centres [b, n, d] and
        the final hidden features [b, n, D] (for the gate)."""
        # Kernel logits reach |c|^2 / s^2 ~ 10^3: bf16 or fp16 would scramble them.
        dtype = torch.promote_types(centres.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_work, c_work = z.to(dtype), centres.to(dtype)
            residual = (z_work - c_work).square().mean(dim=-1, keepdim=True)  # [b, n, 1]
            # The scale is a property of the set, not something to fit the centres towards.
            noise_var = masked_mean(residual, mask).detach().clamp_min(MIN_RESIDUAL_VAR)
            precision = 1.0 / (torch.exp(2 * self.log_bandwidth) * noise_var)  # [b, 1, 1]
            # -|c_i - c_j|^2 / 2 up to a per-query constant, as one dot product:
            # [c_i, 1] . [c_j, -|c_j|^2 / 2] = c_i . c_j - |c_j|^2 / 2.
            ones = torch.ones_like(c_work[..., :1])
            query = torch.cat([c_work, ones], dim=-1) * precision
            key = torch.cat([c_work, -0.5 * c_work.square().sum(dim=-1, keepdim=True)], dim=-1)
            attn_mask = None if mask is None else key_padding_mask(mask)
            pooled = F.scaled_dot_product_attention(
                query.unsqueeze(1), key.unsqueeze(1), z_work.unsqueeze(1), attn_mask=attn_mask,
                scale=1.0).squeeze(1)
            gate = torch.sigmoid(self.gate(features.to(dtype)))
            return (c_work + gate * (pooled - c_work)).to(centres.dtype)

    def extra_repr(self) -> str:
        return f"bandwidth={math.exp(float(self.log_bandwidth.detach())):.3g}"
