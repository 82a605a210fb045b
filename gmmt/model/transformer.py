"""The GMM transformer: a permutation-equivariant set denoiser.

points -> set normalisation (and rotation onto the principal axes, if enabled) -> encoder ->
pre-LN blocks (run in ``block_schedule`` order, with shared weights when repeated, each step
scaled by the flow speed s) -> final LayerNorm -> decoder -> (+ normalised input, in residual
mode) -> (output smoothing, if enabled) -> undo the rotation and normalisation.

Shape legend: b sets, n points, d dims, D hidden width, L distinct blocks. ``mask`` is [b, n]
bool (True = real point) or ``None`` when every set is full.
"""

import math
from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from gmmt.config.model import CountHeadConfig, ModelConfig, TransformerConfig
from gmmt.model.attention import SetAttention
from gmmt.model.flow import FlowSpeed
from gmmt.model.sets import (
    denormalize_set,
    from_principal_axes,
    normalize_set,
    to_principal_axes,
    zero_padding,
)
from gmmt.model.smoothing import OutputSmoothing

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """Point-wise MLP D -> ff_multiplier * D -> D."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN block ``x = x + s * Attn(LN x); x = x + s * FF(LN x)``."""

    def __init__(self, config: TransformerConfig, feature_seed: int) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.ln_attn = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = SetAttention(dim, config.num_heads, config.attention, feature_seed)
        self.ln_ff = nn.LayerNorm(dim, eps=config.norm_eps)
        self.ff = FeedForward(dim, config.ff_multiplier * dim, config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                speed: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, n, D] -> [b, n, D]; ``speed`` [b] is s (``None``: s = 1)."""
        s = 1.0 if speed is None else speed.to(x.dtype)[:, None, None]
        x = x + s * self.dropout(self.attn(self.ln_attn(x), mask))
        return x + s * self.dropout(self.ff(self.ln_ff(x)))


class LinearCodec(nn.Module):
    """Independent input and output maps d -> D and D -> d."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(input_dim, hidden_dim)
        self.decoder = nn.Linear(hidden_dim, input_dim)
        # zero output map: the model starts as the identity (residual) or the set mean (centre)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.encoder(z)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)


class OrthogonalCodec(nn.Module):
    """A tied pair: encode with Q [D, d] (orthonormal columns), decode with Q^T.

    The decoder reads ``gain * h`` through Q^T plus a bias; ``gain`` [D] starts at zero so the
    model starts at the identity (the tied Q^T itself cannot be zero).
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.basis = orthogonal(nn.Linear(input_dim, hidden_dim, bias=False))
        self.gain = nn.Parameter(torch.zeros(hidden_dim))
        self.bias = nn.Parameter(torch.zeros(input_dim))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis(z)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h * self.gain, self.basis.weight.T, self.bias)


class CountHead(nn.Module):
    """Logits of P(K | points) over K = 1..K_max, [b, K_max], from the final hidden states.

    A Deep Sets readout: a per-point MLP, then the masked mean and max over the set's points,
    then an MLP on the pooled vector. It is invariant to the order of the points.
    """

    def __init__(self, config: CountHeadConfig, dim: int, max_components: int) -> None:
        super().__init__()
        width = config.hidden_dim
        self.point = nn.Sequential(nn.Linear(dim, width), nn.GELU())
        self.set = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(),
                                 nn.Linear(width, max_components))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h [b, n, D] -> logits [b, K_max]."""
        f = self.point(h)  # [b, n, H]
        if mask is None:
            mean, top = f.mean(1), f.amax(1)
        else:
            real = mask.unsqueeze(-1)
            mean = f.masked_fill(~real, 0.0).sum(1) / real.sum(1).clamp_min(1)
            top = f.masked_fill(~real, -torch.inf).amax(1).clamp_min(-1e4)
        return self.set(torch.cat([mean, top], -1))


class ModelAux(NamedTuple):
    """What the model says besides the centres (each ``None`` when that part is off)."""

    snr_db: torch.Tensor | None  # [b], the flow's estimate of the set's SNR
    count_logits: torch.Tensor | None  # [b, K_max], logits of P(K | points), K = 1..K_max


class GMMTransformer(nn.Module):
    """Maps a batch of sets [b, n, d] to the predicted centre of every point [b, n, d]."""

    def __init__(self, config: ModelConfig, input_dim: int,
                 max_components: int | None = None) -> None:
        super().__init__()
        t = config.transformer
        self.config = config
        self.input_dim = input_dim
        self.residual = config.prediction.target == "residual"
        self.set_normalization = config.prediction.set_normalization
        self.principal_axes = config.prediction.principal_axes
        self.schedule = t.block_schedule()
        codec = OrthogonalCodec if config.encoder == "orthogonal" else LinearCodec
        self.codec = codec(input_dim, t.hidden_dim)
        # distinct random features per block, so the blocks' approximation errors are independent
        self.blocks = nn.ModuleList(Block(t, t.attention.feature_seed + i)
                                    for i in range(t.num_layers))
        self.ln_f = nn.LayerNorm(t.hidden_dim, eps=t.norm_eps)
        bandwidth = config.prediction.output_smoothing
        self.smoothing = OutputSmoothing(bandwidth) if bandwidth > 0 else None
        self.flow = (FlowSpeed(t.flow, input_dim, t.num_layers, self.schedule)
                     if t.flow.enabled else None)
        self.max_components = max_components
        if config.count_head.enabled:
            if max_components is None or max_components < 1:
                raise ValueError("the count head needs max_components (the prior's K_max)")
            self.count_head = CountHead(config.count_head, t.hidden_dim, max_components)
        else:
            self.count_head = None
        # GPT-2 style: shrink the residual-branch outputs with the effective depth, so the
        # residual stream's variance at init does not grow with the number of block runs.
        std = 0.02 / math.sqrt(2 * len(self.schedule))
        for block in self.blocks:
            for proj in (block.attn.proj, block.ff.proj):
                nn.init.normal_(proj.weight, std=std)
                nn.init.zeros_(proj.bias)

    @overload
    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = ...,
                snr_db: torch.Tensor | None = ..., *,
                return_aux: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = ...,
                snr_db: torch.Tensor | None = ..., *,
                return_aux: Literal[True]) -> tuple[torch.Tensor, ModelAux]: ...

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None,
                snr_db: torch.Tensor | None = None, *, return_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, ModelAux]:
        """Predicted centre of every point, [b, n, d] (0 at padded points).

        ``mask`` [b, n] bool marks real points (``None``: all real). ``snr_db`` [b] is required
        when the flow speed reads the true SNR, ignored otherwise. With ``return_aux=True``
        returns ``(prediction, ModelAux)``; call it this way (rather than
        :meth:`forward_with_aux`) through a DDP/Accelerate wrapper.
        """
        self._check_inputs(points, mask)
        if self.set_normalization:
            z, mean, scale = normalize_set(points, mask)
            if self.principal_axes:
                z, frame = to_principal_axes(z, mask)  # frame [b, d, d]
        else:
            z = zero_padding(points, mask)
        speeds, snr_estimate = (None, None) if self.flow is None else self.flow(z, mask, snr_db)
        h = self.codec.encode(z)  # [b, n, D]
        for i in self.schedule:
            h = self.blocks[i](h, mask, None if speeds is None else speeds[:, i])
        h = self.ln_f(h)
        count_logits = None if self.count_head is None else self.count_head(h, mask)
        out = self.codec.decode(h)  # [b, n, d]
        if self.residual:
            out = z + out
        if self.smoothing is not None:
            out = self.smoothing(z, out, mask)
        if self.set_normalization:
            if self.principal_axes:
                out = from_principal_axes(out, frame)
            out = denormalize_set(out, mean, scale)
        out = zero_padding(out, mask)
        return (out, ModelAux(snr_estimate, count_logits)) if return_aux else out

    def forward_with_aux(self, points: torch.Tensor, mask: torch.Tensor | None = None,
                         snr_db: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, ModelAux]:
        """``(prediction [b, n, d], ModelAux)``: the SNR estimate is ``None`` unless the flow
        is enabled with ``snr_source = "estimated"``; the count logits are ``None`` unless the
        count head is enabled."""
        return self(points, mask, snr_db, return_aux=True)

    @torch.no_grad()
    def count_probabilities(self, points: torch.Tensor, mask: torch.Tensor | None = None
                            ) -> torch.Tensor | None:
        """P(K | points) over K = 1..K_max, [b, K_max] float32 (``None`` without a count
        head)."""
        if self.count_head is None:
            return None
        logits = self(points, mask, return_aux=True)[1].count_logits
        return torch.softmax(logits.float(), -1)

    def _check_inputs(self, points: torch.Tensor, mask: torch.Tensor | None) -> None:
        if points.dim() != 3 or points.shape[-1] != self.input_dim:
            raise ValueError(f"points must be [b, n, {self.input_dim}], got "
                             f"{list(points.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != points.shape[:2]):
            raise ValueError(f"mask must be bool [{points.shape[0]}, {points.shape[1]}], got "
                             f"{mask.dtype} {list(mask.shape)}")
