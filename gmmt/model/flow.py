"""Flow speed: the factor s in ``x = x + s * Attn(LN x); x = x + s * FF(LN x)``.

Each block's update is a step of a discretised flow; s sets its length. With the flow enabled, s
is predicted per set from its SNR (noisy sets may want shorter steps than clean ones), either
from the generator's true SNR (research only) or from an estimate a small head makes from the
set itself (trained by the caller with an auxiliary loss, so inference needs no ground truth).

Shape legend: b sets, n points, d dims, L distinct blocks, P predictors (L or 1), H estimator
width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gmmt.config.model import FlowConfig
from gmmt.model.sets import masked_mean

# softplus(_SPEED_BIAS) = 1: the monotonic predictor starts at s = 1 for snr_norm = 0.
_SPEED_BIAS = math.log(math.e - 1.0)
# The monotonic predictor's initial slope magnitude (before the outer softplus): a gentle
# decrease of s with SNR that training can grow or shrink towards 0.
_MONOTONIC_SLOPE_INIT = 0.1


class SpeedPredictor(nn.Module):
    """P independent scalar predictors of s from a normalised SNR, [b] -> [b, P].

    ``linear``: s = a + c * snr_norm (a = 1, c = 0 at init, so s = 1 everywhere).
    ``monotonic``: s = softplus(a - softplus(c) * snr_norm): non-increasing in SNR because the
    slope softplus(c) is positive, and positive because of the outer softplus; s = 1 at
    snr_norm = 0 at init.
    """

    def __init__(self, kind: str, num_predictors: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.bias = nn.Parameter(torch.ones(num_predictors))
            self.slope = nn.Parameter(torch.zeros(num_predictors))
        elif kind == "monotonic":
            self.bias = nn.Parameter(torch.full((num_predictors,), _SPEED_BIAS))
            raw = math.log(math.expm1(_MONOTONIC_SLOPE_INIT))  # inverse softplus
            self.slope = nn.Parameter(torch.full((num_predictors,), raw))
        else:
            raise ValueError(f"unknown flow predictor {kind!r}")

    def forward(self, snr_norm: torch.Tensor) -> torch.Tensor:
        x = snr_norm.unsqueeze(-1)  # [b, 1]
        if self.kind == "linear":
            return self.bias + self.slope * x
        return F.softplus(self.bias - F.softplus(self.slope) * x)


class SNREstimator(nn.Module):
    """Permutation-invariant SNR estimate (dB) of a set, [b, n, d] -> [b] (DeepSets).

    Each point's coordinates and squared norm go through a small MLP, are averaged over the
    real points, and a second MLP maps the pooled features to the SNR. On a normalised set the
    averaged features can express moments such as the kurtosis, which depend on how tightly
    the points cluster. The last layer starts at zero, so the first estimate is
    ``centre_db`` for every set.
    """

    def __init__(self, input_dim: int, hidden_dim: int, centre_db: float,
                 scale_db: float) -> None:
        super().__init__()
        self.centre_db = centre_db
        self.scale_db = scale_db
        self.point_mlp = nn.Sequential(
            nn.Linear(input_dim + 1, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU())
        self.head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats = torch.cat([z, z.square().sum(dim=-1, keepdim=True)], dim=-1)  # [b, n, d+1]
        pooled = masked_mean(self.point_mlp(feats), mask).squeeze(1)  # [b, H]
        # predict in normalised units so the head works at O(1) scale
        raw = self.head(pooled).squeeze(-1).to(z.dtype)  # float32 even under autocast
        return self.centre_db + self.scale_db * raw


class FlowSpeed(nn.Module):
    """Per-set speed of every distinct block, [b, L], from a true or estimated SNR.

    ``schedule`` is the block order of the stack (``TransformerConfig.block_schedule()``): with
    ``distribution = "fractional"`` the speed of a block that runs r times is divided by r, so
    the block's total step length does not grow with repetition.
    """

    def __init__(self, config: FlowConfig, input_dim: int, num_layers: int,
                 schedule: list[int]) -> None:
        super().__init__()
        self.snr_source = config.snr_source
        self.centre_db = config.snr_center_db
        self.scale_db = config.snr_scale_db
        self.num_layers = num_layers
        self.predictor = SpeedPredictor(config.predictor, num_layers if config.per_layer else 1)
        repeats = torch.bincount(torch.tensor(schedule), minlength=num_layers).float()
        if config.distribution == "direct":
            repeats = torch.ones(num_layers)
        # a buffer so it follows .to(device) and dtype; not saved: it is derived from the config
        self.register_buffer("inv_repeats", 1.0 / repeats.clamp_min(1.0), persistent=False)
        self.estimator = None
        if config.snr_source == "estimated":
            self.estimator = SNREstimator(input_dim, config.estimator_hidden_dim,
                                          config.snr_center_db, config.snr_scale_db)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None,
                snr_db: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Speeds [b, L] and the estimated SNR in dB [b] (``None`` when the true SNR is used).

        ``z`` [b, n, d] is the normalised input set, read only by the estimator.
        """
        estimate = None
        if self.estimator is not None:
            estimate = self.estimator(z, mask)
            # The estimator learns only from the auxiliary loss: detaching keeps "estimated" an
            # estimate of the true SNR rather than a free feature shaped by the main loss.
            snr = estimate.detach()
        else:
            if snr_db is None:
                raise ValueError("flow.snr_source is 'true': pass snr_db [b] to the model")
            if snr_db.shape != z.shape[:1]:
                raise ValueError(f"snr_db must have shape [{z.shape[0]}], got "
                                 f"{list(snr_db.shape)}")
            snr = snr_db.to(z.dtype)
        speeds = self.predictor((snr - self.centre_db) / self.scale_db)  # [b, P]
        speeds = speeds.expand(-1, self.num_layers)  # a global predictor serves every block
        return speeds * self.inv_repeats.to(speeds.dtype), estimate
