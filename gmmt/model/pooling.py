"""Readouts that average over the points whose predicted centres lie near each point's own.

A transformer's attention averages points with weights that are never exactly equal inside a
cluster, so its predicted centres jitter from point to point within a cluster, and each keeps
a share of its own point's noise. Both readouts here weigh the points j of a set for point i by
a Gaussian kernel on the *predicted* centres c (which collapse together within a cluster):

    w_ij = softmax_j(-|c_i - c_j|^2 / (2 h^2 s^2))

with ``s^2`` the set's mean squared residual |z - c|^2 per coordinate (a data-only noise
scale) and ``h`` a learned bandwidth.

* :class:`CentrePooling` averages the *inputs*, pooled_i = sum_j w_ij z_j. On a well separated
  cluster the weights are uniform over its points and the pooled value is its sample mean;
  where clusters overlap it blurs, so a learned per-point gate g_i in (0, 1) mixes it in:
  out_i = c_i + g_i (pooled_i - c_i).
* :class:`OutputSmoothing` averages the *predictions*, out_i = sum_j w_ij c_j. It removes the
  jitter within a cluster and keeps what the network learned about each cluster as a whole.
  With a narrow kernel (h ~ 0.1) it helps even a model trained without it: where predictions
  legitimately vary (overlapping clusters) they vary smoothly, and averaging near neighbours
  leaves them almost unchanged. Trained with it, the model widens h (to 1.3-1.6 in the
  ``cpu_reference`` runs) and learns predictions that such averaging sharpens.

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


def _kernel_average(values: torch.Tensor, z: torch.Tensor, centres: torch.Tensor,
                    log_bandwidth: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum_j w_ij values_j with the kernel in the module docstring, [b, n, d].

    All of ``values``, ``z`` and ``centres`` must already be in the working dtype (>= float32:
    the logits reach |c|^2 / (h s)^2 ~ 10^3-10^5, which bf16 or fp16 would scramble).
    """
    residual = (z - centres).square().mean(dim=-1, keepdim=True)  # [b, n, 1]
    # The scale is a property of the set, not something to fit the centres towards.
    noise_var = masked_mean(residual, mask).detach().clamp_min(MIN_RESIDUAL_VAR)
    precision = 1.0 / (torch.exp(2 * log_bandwidth) * noise_var)  # [b, 1, 1]
    # -|c_i - c_j|^2 / 2 up to a per-query constant, as one dot product:
    # [c_i, 1] . [c_j, -|c_j|^2 / 2] = c_i . c_j - |c_j|^2 / 2.
    ones = torch.ones_like(centres[..., :1])
    query = torch.cat([centres, ones], dim=-1) * precision
    key = torch.cat([centres, -0.5 * centres.square().sum(dim=-1, keepdim=True)], dim=-1)
    attn_mask = None if mask is None else key_padding_mask(mask)
    return F.scaled_dot_product_attention(
        query.unsqueeze(1), key.unsqueeze(1), values.unsqueeze(1), attn_mask=attn_mask,
        scale=1.0).squeeze(1)


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _bandwidth_repr(log_bandwidth: torch.Tensor) -> str:
    return f"bandwidth={math.exp(float(log_bandwidth.detach())):.3g}"


class CentrePooling(nn.Module):
    """Gated averaging of the inputs (see the module docstring); starts with bandwidth h = 1
    and its gates nearly shut (0.12), so that training first shapes the centres it pools
    around."""

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
        dtype = _working_dtype(centres)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_work, c_work = z.to(dtype), centres.to(dtype)
            pooled = _kernel_average(z_work, z_work, c_work, self.log_bandwidth, mask)
            gate = torch.sigmoid(self.gate(features.to(dtype)))
            return (c_work + gate * (pooled - c_work)).to(centres.dtype)

    def extra_repr(self) -> str:
        return _bandwidth_repr(self.log_bandwidth)


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
        dtype = _working_dtype(centres)
        with torch.autocast(device_type=z.device.type, enabled=False):
            c_work = centres.to(dtype)
            smoothed = _kernel_average(c_work, z.to(dtype), c_work, self.log_bandwidth, mask)
            return smoothed.to(centres.dtype)

    def extra_repr(self) -> str:
        return _bandwidth_repr(self.log_bandwidth)
