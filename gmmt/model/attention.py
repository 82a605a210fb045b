"""Multi-head self-attention over a set: exact softmax, or linear-time random features.

Shape legend: b sets, n points, D hidden width, h heads, e = D / h head width, m random
features. ``mask`` is [b, n] bool (True = real point) or ``None`` when every set is full.
Padded points never act as keys, so they cannot influence real points; their own outputs are
finite but meaningless.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gmmt.config.model import AttentionConfig

# Added to every positive feature so a denominator over >= 1 real key can never be 0
# (the FAVOR+ "numerical stabiliser").
FEATURE_EPS = 1e-6


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """[b, n] real-point mask -> [b, 1, 1, n] boolean SDPA mask (True = may be attended to).

    A set without a single real point would give every query a row of masked keys, which
    softmax turns into NaN; such sets attend to all their (padded) points instead. Sets with at
    least one real point are unaffected.
    """
    empty = ~mask.any(dim=1, keepdim=True)  # [b, 1]
    return (mask | empty)[:, None, None, :]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Exact attention, q/k/v [b, h, n, e] -> [b, h, n, e], via the fused SDPA kernels."""
    attn_mask = None if mask is None else key_padding_mask(mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def orthogonal_gaussian_features(num_features: int, head_dim: int,
                                 generator: torch.Generator) -> torch.Tensor:
    """Random projections w [m, e]: blocks of orthogonal rows with Gaussian-like norms.

    Orthogonal rows give a lower-variance estimate of the softmax kernel than i.i.d. Gaussian
    ones (Performer, "ORF"); rescaling each row by the norm of an independent Gaussian vector
    keeps every row's marginal distribution N(0, I_e), so the estimator stays unbiased.
    """
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gauss = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        # QR's sign convention biases Q; fixing the signs by diag(R) makes it Haar-uniform
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator,
                        dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(torch.float32)


def positive_features(x: torch.Tensor, w: torch.Tensor, stabiliser_dims: tuple[int, ...],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ positive features phi(x) = exp(w.x - |x|^2 / 2), x [b, h, n, e] -> [b, h, n, m].

    E[phi(q) . phi(k)] = exp(q . k), so sums over phi(k) estimate softmax sums. A max over
    ``stabiliser_dims`` is subtracted in the exponent: any factor shared by all terms of one
    numerator/denominator pair cancels, so queries use their own max (dims (-1,)) and keys the
    max over all real keys of the set (dims (-2, -1)). Padded keys (``mask``) get feature 0.
    """
    logits = x @ w.T - 0.5 * x.square().sum(dim=-1, keepdim=True)  # [b, h, n, m]
    real = None if mask is None else mask[:, None, :, None]  # [b, 1, n, 1]
    masked = logits if real is None else logits.masked_fill(~real, -math.inf)
    stab = masked.amax(dim=stabiliser_dims, keepdim=True)
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # empty set
    phi = torch.exp(logits - stab) + FEATURE_EPS
    return phi if real is None else phi * real


def random_feature_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             features: torch.Tensor, mask: torch.Tensor | None = None,
                             key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Linear-time approximation of softmax attention, q/k/v [b, h, n, e] -> [b, h, n, e].

    ``features`` are the random projections [m, e]. ``key_keep`` [b, h, n, 1] optionally drops
    keys (dropout): the kept keys are renormalised exactly like softmax renormalises weights.
    Cost O(n m e) instead of O(n^2 e).
    """
    dtype = q.dtype
    # exp and the long sums need float32 even when the rest of the model runs in half precision
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                   for t in (q, k, v))
        w = features.to(q.dtype)
        scale = q.shape[-1] ** -0.25  # splits softmax's 1/sqrt(e) between q and k
        phi_q = positive_features(q * scale, w, (-1,))  # [b, h, n, m]
        phi_k = positive_features(k * scale, w, (-2, -1), mask)  # [b, h, n, m]
        if key_keep is not None:
            phi_k = phi_k * key_keep
        kv = phi_k.transpose(-2, -1) @ v  # [b, h, m, e]
        k_sum = phi_k.sum(dim=-2).unsqueeze(-1)  # [b, h, m, 1]
        numer = phi_q @ kv  # [b, h, n, e]
        denom = (phi_q @ k_sum).clamp_min(torch.finfo(q.dtype).tiny)  # [b, h, n, 1]
        return (numer / denom).to(dtype)


class SetAttention(nn.Module):
    """Multi-head self-attention without positions (permutation-equivariant).

    ``config.type`` picks exact softmax attention or random-feature attention; both share the
    same projections, so one can be swapped for the other on a trained model.
    """

    def __init__(self, dim: int, num_heads: int, config: AttentionConfig,
                 feature_seed: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kind = config.type
        self.dropout = config.dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if self.kind == "random_feature":
            seed = config.feature_seed if feature_seed is None else feature_seed
            generator = torch.Generator().manual_seed(seed)
            # a buffer, not a parameter: fixed, saved with the model, moved by .to()/.double()
            self.register_buffer("features", orthogonal_gaussian_features(
                config.num_features, dim // num_heads, generator))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, n, D] -> [b, n, D]."""
        b, n, dim = x.shape
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2)  # [b, h, n, e]
                   for t in self.qkv(x).split(dim, dim=-1))
        dropout_p = self.dropout if self.training else 0.0
        if self.kind == "softmax":
            y = softmax_attention(q, k, v, mask, dropout_p)
        else:
            keep = None
            if dropout_p > 0:  # drop whole keys: the linear-time analogue of weight dropout
                keep = torch.rand(b, self.num_heads, n, 1, device=x.device) >= dropout_p
            y = random_feature_attention(q, k, v, self.features, mask, keep)
        return self.proj(y.transpose(1, 2).reshape(b, n, dim))
