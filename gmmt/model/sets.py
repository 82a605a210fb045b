"""Set-level statistics shared by the model: masked means and the input set normalisation.

Shape legend: b sets, n points, d dims, c any feature width. ``mask`` is [b, n] bool with True
marking real points, or ``None`` when every set is full.
"""

import torch

# Smallest set scale we divide by: keeps a degenerate set (all points equal) finite.
SCALE_EPS = 1e-6


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the points of each set, [b, n, c] -> [b, 1, c], ignoring padded points."""
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    weights = mask.unsqueeze(-1).to(x.dtype)  # [b, n, 1]
    # clamp: a set without real points gets mean 0 instead of 0/0
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x * weights).sum(dim=1, keepdim=True) / count


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set padded points to 0, so whatever the caller left there (even NaN) cannot leak."""
    if mask is None:
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def normalize_set(points: torch.Tensor, mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre each set on its mean and divide by its scale.

    The scale is the RMS distance to the mean per coordinate, so a normalised set has unit
    average variance per coordinate whatever d is. A model that reads ``z`` and whose output is
    mapped back with :func:`denormalize_set` is translation- and scale-equivariant by
    construction.

    Returns ``(z [b, n, d], mean [b, 1, d], scale [b, 1, 1])``; padded rows of ``z`` are 0.
    """
    points = zero_padding(points, mask)
    mean = masked_mean(points, mask)
    centred = zero_padding(points - mean, mask)
    var = masked_mean(centred.square().mean(dim=-1, keepdim=True), mask)  # [b, 1, 1]
    scale = var.sqrt().clamp_min(SCALE_EPS)
    return centred / scale, mean, scale


def denormalize_set(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_set`: map normalised coordinates back to the input frame."""
    return z * scale + mean


def to_principal_axes(z: torch.Tensor, mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each centred set onto its principal axes: ``(z @ frame, frame [b, d, d])``, the
    columns of ``frame`` along decreasing variance; :func:`from_principal_axes` maps back.

    An eigenvector's sign is arbitrary, so each axis is pointed where the set's third moment
    along it is positive: the frame is then a function of the set alone, and a model run in it
    is rotation- and reflection-equivariant. (Where two variances tie, or a third moment is
    zero, the frame is still valid but jumps under small changes of the set.) The frame is a
    fixed function of the data, so no gradient flows through it. Padded rows stay 0.
    """
    b, n, d = z.shape
    # eigh needs float32 or wider, and autocast must not lower the moments or the rotation.
    with torch.autocast(device_type=z.device.type, enabled=False):
        work = z.detach().to(torch.promote_types(z.dtype, torch.float32))
        outer = (work.unsqueeze(-1) * work.unsqueeze(-2)).reshape(b, n, d * d)
        covariance = masked_mean(outer, mask).reshape(b, d, d)
        # eigh is not implemented on every backend (MPS); d x d matrices are cheap anywhere.
        on_cpu = covariance.device.type not in ("cpu", "cuda")
        _, vectors = torch.linalg.eigh(covariance.cpu() if on_cpu else covariance)
        frame = vectors.to(work.device).flip(-1)  # columns by decreasing variance
        rotated = work @ frame
        sign = torch.where(masked_mean(rotated.pow(3), mask) < 0, -1.0, 1.0)  # [b, 1, d]
        return (rotated * sign).to(z.dtype), (frame * sign).to(z.dtype)


def from_principal_axes(x: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_principal_axes`: ``x @ frame^T``, kept out of autocast so that a
    low-precision rotation does not round the output."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, frame.dtype)
        return x.to(dtype) @ frame.to(dtype).mT
