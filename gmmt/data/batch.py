"""The batch of sets every part of gmmt passes around.

Shape legend (used throughout gmmt): ``b`` sets, ``n`` points per set, ``d`` dimensions,
``k`` mixture components (padded to K_max within a batch).
"""

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class GMMBatch:
    """Sets drawn from random GMMs, with the ground truth that generated them.

    Padded components (index >= k of a set) have zero weight and zero centre. ``mask`` is
    ``None`` when every set has the same number of points; otherwise True marks real points.
    """

    points: torch.Tensor  # [b, n, d] float
    labels: torch.Tensor  # [b, n] long, component of each point
    centres: torch.Tensor  # [b, k, d] float
    weights: torch.Tensor  # [b, k] float, zero for padded components
    sigma: torch.Tensor  # [b] float, noise standard deviation
    snr_db: torch.Tensor  # [b] float
    k: torch.Tensor  # [b] long, number of real components
    mask: torch.Tensor | None = None  # [b, n] bool, True = real point

    @property
    def num_sets(self) -> int:
        return self.points.shape[0]

    @property
    def target(self) -> torch.Tensor:
        """Each point's true centre, [b, n, d] (what a perfect denoiser would output)."""
        index = self.labels.unsqueeze(-1).expand(-1, -1, self.centres.shape[-1])
        return torch.gather(self.centres, 1, index)

    @property
    def signal_var(self) -> torch.Tensor:
        """Per-coordinate weighted variance of the centres, [b] (sigma^2 * 10^(snr/10))."""
        return self.sigma.square() * torch.pow(10.0, self.snr_db / 10.0)

    def point_counts(self) -> torch.Tensor:
        """Real points per set, [b] long."""
        if self.mask is None:
            return torch.full((self.num_sets,), self.points.shape[1], dtype=torch.long,
                              device=self.points.device)
        return self.mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "GMMBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def slice(self, start: int, stop: int) -> "GMMBatch":
        """Sets ``start:stop`` of the batch."""
        return replace(self, **{f.name: getattr(self, f.name)[start:stop]
                                for f in fields(self) if getattr(self, f.name) is not None})
