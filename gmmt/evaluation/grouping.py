"""The model's own clustering: group a set's predicted centres without being told K.

The model outputs one predicted centre per point, and the predictions of one cluster collapse
onto each other. :func:`group_predictions` finds those collapsed groups:

1. **Noise scale from the data alone.** sigma_hat^2 = mean over the set's real points of
   |x - pred|^2 / d, the residual the model removed (clamped away from 0 relative to the set's
   spread). Everything below is measured in units of h = ``bandwidth`` * sigma_hat, so the
   grouping is invariant to translating or rescaling a set.
2. **Mean shift** of every prediction over the set's predictions with a Gaussian kernel of
   standard deviation h, until every mode moves less than ``tol`` * h (or ``max_iter`` steps).
3. **Merging modes** closer than ``merge_radius`` * h: the connected components of the
   converged modes (two modes of a Gaussian density estimate sit at least ~2 h apart, so modes
   of one basin that stopped a little apart are joined and distinct modes are not).
4. **A minimum size.** Groups smaller than ``min_size`` points (a stray point whose prediction
   stopped between clusters, a few points of an overlap) are merged into the nearest group
   that is large enough, by distance between group means; a set whose groups are all small
   becomes one group.

Everything is batched over sets in torch. Since one cluster's predictions collapse, they are
first pooled into cells a quarter of h wide (weighted by their counts), so the pairwise work
runs over a few cells per cluster rather than every point; it runs in blocks of rows, and only
over modes still moving, so memory stays bounded for sets of thousands of points.

Shape legend: b sets, n points, d dims. ``mask`` is [b, n] bool (True = real point) or ``None``.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Default minimum group size as a fraction of the set's real points (and never below 2, so a
# lone point is never a group). 1 % rather than 2 %: under the generator's Dirichlet(5) weights
# a real cluster holds under 2 % of the points in ~23 % of 15-component sets (the `complex`
# prior) but under 1 % in ~1.4 % of them; on the `simple` and `standard` priors (K <= 7) both
# are below 0.4 %. Stray predictions come one or a few at a time, which 1 % still absorbs.
MIN_FRACTION = 0.01
# Smallest sigma_hat^2 relative to the set's per-coordinate variance: predictions equal to the
# points (a zero residual) give a tiny kernel, every point its own group, and so one group.
MIN_NOISE_FRACTION = 1e-6
# Entries of one block of pairwise distances ([b, c, n] float32, 64 MiB).
CHUNK_ELEMENTS = 1 << 24
# Largest squared norm, in kernel units, at which float32 distances are trusted (see below).
FLOAT32_MAX_NORM2 = 1e4
# Width of the cells predictions are pooled into, in kernel units (see _bin).
BIN_WIDTH = 0.25
# Rows of one block: small enough that a set with a few rows left wastes little.
BLOCK_COLUMNS = 64


@dataclass
class Grouping:
    """The groups of each set's predictions.

    Attributes:
        labels: [b, n] long, group of each point, 0..k_hat-1 numbered by decreasing group size
            (ties in the order of the groups' first cells, by coordinates); 0 at padded
            points.
        k_hat: [b] long, number of groups (0 for a set without real points).
        centres: [b, n, d] mean prediction of each point's group; 0 at padded points.
    """

    labels: Tensor
    k_hat: Tensor
    centres: Tensor


def _blocks(rows: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
    """The True entries of ``rows`` [b, n] in blocks for batched pairwise work.

    Each set's selected indices are packed to the front; a block is a run of ``c`` packed
    columns over the sets that have entries there: ``(sets [l], index [l, c])``, -1 where a
    set runs out. A set joins only the blocks it fills (plus one partial), so a few slow rows
    in one set do not cost a pass over every set; ``l * c * n`` stays within CHUNK_ELEMENTS.
    """
    b = rows.shape[0]
    counts = rows.sum(1)
    width = int(counts.max()) if rows.numel() else 0
    packed = torch.full((b, width), -1, dtype=torch.long, device=rows.device)
    sets, idx = rows.nonzero(as_tuple=True)
    packed[sets, rows.cumsum(1)[sets, idx] - 1] = idx
    step = max(1, min(BLOCK_COLUMNS, CHUNK_ELEMENTS // max(1, b * n)))
    blocks = []
    for start in range(0, width, step):
        members = (counts > start).nonzero().squeeze(1)
        blocks.append((members, packed[members, start:start + step]))
    return blocks


def _of(values: Tensor, sets: Tensor) -> Tensor:
    """values[sets], without a copy when ``sets`` is every set in order."""
    return values if len(sets) == len(values) else values[sets]


def _take(values: Tensor, sets: Tensor, index: Tensor) -> Tensor:
    """values [b, n, ...] at sets [l] and index [l, c] (-1 read as 0) -> [l, c, ...]."""
    return values[sets.unsqueeze(1), index.clamp_min(0)]


def _put(values: Tensor, sets: Tensor, index: Tensor, new: Tensor) -> None:
    """values[sets[s], index[s, i]] = new[s, i] where index >= 0 (in place)."""
    valid = index >= 0
    values[sets.unsqueeze(1).expand_as(index)[valid], index[valid]] = new[valid]


def _squared_distances(q: Tensor, keys: Tensor) -> Tensor:
    """|q_i - k_j|^2, [b, c, n] for q [b, c, d] and keys [b, n, d], as one batched matmul.

    The |q|^2 + |k|^2 - 2 q.k expansion loses ~eps * |q|^2 to cancellation; in kernel units
    around the set's mean |q|^2 stays small enough for float32 on ordinary data, and
    :func:`group_predictions` switches to float64 when it does not.
    """
    q2 = q.square().sum(-1, keepdim=True)  # [b, c, 1]
    k2 = keys.square().sum(-1).unsqueeze(1)  # [b, 1, n]
    return torch.baddbmm(q2 + k2, q, keys.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)


def _noise_scale(pred: Tensor, points: Tensor, real: Tensor, count: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(sigma_hat [b], set mean of the points [b, d]) in float64."""
    pad = ~real.unsqueeze(-1)  # [b, n, 1]
    w = real.unsqueeze(-1).to(torch.float64)
    # masked_fill, not a product: padded rows may hold NaN or inf
    x = points.to(torch.float64).masked_fill(pad, 0.0)
    c = pred.to(torch.float64).masked_fill(pad, 0.0)
    d = x.shape[-1]
    mean = x.sum(1) / count.unsqueeze(-1)  # [b, d]
    residual = (x - c).square().sum((1, 2)) / (count * d)
    var = ((x - mean.unsqueeze(1)) * w).square().sum((1, 2)) / (count * d)
    # relative to the set's spread and offset, so the floor scales with the data; `tiny`
    # keeps a set of identical points finite
    floor = (MIN_NOISE_FRACTION * var + 1e-12 * mean.square().mean(-1)
             + torch.finfo(torch.float64).tiny)
    return torch.maximum(residual, floor).sqrt(), mean


def _bin(y: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pool each set's predictions into cells of BIN_WIDTH kernel units.

    Returns ``(centroids [b, u, d], weights [b, u], cell of each point [b, n])``: the mean and
    the number of the predictions in each occupied cell, packed per set (weight 0 = no cell;
    padded points read cell 0). Collapsed predictions share a few cells, so the pairwise work
    below runs over cells, not points; the density estimate changes by ~BIN_WIDTH^2 / 24 of
    the kernel's variance.
    """
    b, n, d = y.shape
    sets, idx = real.nonzero(as_tuple=True)
    values = y[sets, idx]  # [a, d]
    cells = torch.cat([sets.unsqueeze(1), torch.floor(values / BIN_WIDTH).long()], dim=1)
    unique, inverse, counts = torch.unique(cells, dim=0, return_inverse=True,
                                           return_counts=True)  # sorted: by set first
    cell_set = unique[:, 0]
    per_set = torch.bincount(cell_set, minlength=b)
    slot = torch.arange(len(unique), device=y.device) - (per_set.cumsum(0) - per_set)[cell_set]
    width = int(per_set.max()) if len(unique) else 0
    sums = torch.zeros(len(unique), d, dtype=y.dtype, device=y.device).index_add_(0, inverse,
                                                                                 values)
    centroids = torch.zeros(b, width, d, dtype=y.dtype, device=y.device)
    centroids[cell_set, slot] = sums / counts.unsqueeze(1).to(y.dtype)
    weights = torch.zeros(b, width, dtype=y.dtype, device=y.device)
    weights[cell_set, slot] = counts.to(y.dtype)
    point_cell = torch.zeros(b, n, dtype=torch.long, device=y.device)
    point_cell[sets, idx] = slot[inverse]
    return centroids, weights, point_cell


def _mean_shift(y: Tensor, weights: Tensor, max_iter: int, tol: float) -> Tensor:
    """Modes [b, u, d] reached from every cell ``y`` [b, u, d] (kernel units: the Gaussian
    kernel has standard deviation 1) over the density of the cells weighted by ``weights``
    [b, u] (0 = no cell, which pulls nothing and stays where it is)."""
    u = y.shape[1]
    # -|y_j|^2 / 2 + log w_j: [b, 1, u]
    key_bias = (-0.5 * y.square().sum(-1) + weights.log()).unsqueeze(1)
    modes = y.clone()
    active = weights > 0
    for _ in range(max_iter):
        # only the modes still moving are stepped: late iterations touch a few rows of a
        # few sets
        blocks = _blocks(active, u)
        if not blocks:
            break
        for sets, index in blocks:
            keys = _of(y, sets)  # [l, u, d]
            old = _take(modes, sets, index)  # [l, c, d]
            # softmax_j(-|m_i - y_j|^2 / 2 + log w_j) = softmax_j(m_i . y_j - |y_j|^2 / 2
            # + log w_j): one matmul
            logits = torch.baddbmm(_of(key_bias, sets), old, keys.transpose(1, 2))
            new = torch.bmm(torch.softmax(logits, dim=-1), keys)
            _put(modes, sets, index, new)
            # a mode that moved less than tol has converged: later steps skip it
            _put(active, sets, index, (new - old).square().sum(-1) > tol * tol)
    return modes


def _components(modes: Tensor, valid: Tensor, radius: float) -> Tensor:
    """Connected components of the graph joining valid modes [b, u, d] closer than
    ``radius``: each one's component as the index of its smallest member, [b, u] long (own
    index where not valid)."""
    b, u, _ = modes.shape
    labels = torch.arange(u, device=modes.device).expand(b, u).contiguous()
    blocks = _blocks(valid, u)
    sentinel = u  # larger than every index: an invalid or distant key never wins the min
    for _ in range(u):  # label propagation with pointer jumping: a few passes in practice
        new = labels.clone()
        for sets, index in blocks:
            d2 = _squared_distances(_take(modes, sets, index), _of(modes, sets))
            near = (d2 < radius * radius) & _of(valid, sets).unsqueeze(1)  # [l, c, u]
            smallest = torch.where(near, _of(labels, sets).unsqueeze(1), sentinel).min(-1).values
            _put(new, sets, index, torch.minimum(smallest, _take(labels, sets, index)))
        new = new.gather(1, new)  # jump: take the label of one's label
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _group_sums(values: Tensor, root: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(weight [b, u], weighted sum of values [b, u, d]) per group, indexed by its root."""
    w = weights.to(values.dtype)
    total = torch.zeros_like(w).scatter_add_(1, root, w)
    sums = torch.zeros_like(values).scatter_add_(
        1, root.unsqueeze(-1).expand_as(values), values * w.unsqueeze(-1))
    return total, sums


def _merge_small(y: Tensor, root: Tensor, weights: Tensor, min_size: Tensor) -> Tensor:
    """Each group of fewer than ``min_size`` [b] points joins the nearest large group
    (distance between group means in ``y``); a set without a large group becomes one group."""
    b, u, _ = y.shape
    size, sums = _group_sums(y, root, weights)
    centre = sums / size.clamp_min(1).unsqueeze(-1)  # [b, u, d], at each root
    large = size >= min_size.unsqueeze(-1)  # only roots have sizes
    small_root = (size > 0) & ~large
    target = torch.arange(u, device=y.device).expand(b, u).contiguous()
    for sets, index in _blocks(small_root & large.any(1, keepdim=True), u):
        d2 = _squared_distances(_take(centre, sets, index), _of(centre, sets))
        far = ~_of(large, sets).unsqueeze(1)
        _put(target, sets, index, d2.masked_fill(far, math.inf).argmin(-1))
    # no large group: everything joins the set's first cell
    target = torch.where(large.any(1, keepdim=True), target, 0)
    return target.gather(1, root)


@torch.no_grad()
def group_predictions(pred: Tensor, points: Tensor, mask: Tensor | None = None, *,
                      bandwidth: float = 0.5, min_size: int | None = None,
                      min_fraction: float = MIN_FRACTION, merge_radius: float = 1.0,
                      max_iter: int = 100, tol: float = 1e-3) -> Grouping:
    """Group each set's predicted centres by mean shift (see the module docstring).

    Args:
        pred: [b, n, d] predicted centre of every point.
        points: [b, n, d] the points themselves (for the noise scale sigma_hat).
        mask: [b, n] bool, True = real point; ``None``: all real.
        bandwidth: kernel standard deviation h in units of sigma_hat. 0.5: the predictions
            of one cluster lie far closer together than sigma, while two clusters' centres are
            at least a few sigma apart wherever their points can be told apart.
        min_size: smallest group, the same for every set; ``None``: max(2, ceil(min_fraction
            * the set's real points)).
        min_fraction: see ``min_size``.
        merge_radius: modes closer than ``merge_radius`` * h are one group.
        max_iter, tol: mean-shift steps at most; a mode that moves less than ``tol`` * h has
            converged.

    Returns:
        :class:`Grouping`: labels [b, n], k_hat [b], centres [b, n, d] (in ``pred``'s dtype).
    """
    if pred.dim() != 3 or pred.shape != points.shape:
        raise ValueError(f"pred and points must both be [b, n, d], got {list(pred.shape)} "
                         f"and {list(points.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != pred.shape[:2]):
        raise ValueError(f"mask must be bool {list(pred.shape[:2])}, got {mask.dtype} "
                         f"{list(mask.shape)}")
    if not bandwidth > 0 or not merge_radius > 0 or max_iter < 1 or not tol > 0:
        raise ValueError("bandwidth, merge_radius and tol must be > 0 and max_iter >= 1")
    if min_size is not None and min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    b, n, _ = pred.shape
    real = torch.ones(b, n, dtype=torch.bool, device=pred.device) if mask is None else mask
    count = real.sum(1)
    if min_size is None:
        smallest = (min_fraction * count.to(torch.float64)).ceil().clamp_min(2)
    else:
        smallest = torch.full((b,), float(min_size), dtype=torch.float64, device=pred.device)

    # kernel units (centred on the set's mean, h = 1), computed in float64 so that removing a
    # large offset loses nothing
    sigma, mean = _noise_scale(pred, points, real, count.clamp_min(1).to(torch.float64))
    h = (bandwidth * sigma).view(b, 1, 1)
    y = ((pred.to(torch.float64) - mean.unsqueeze(1)) / h)
    y = y.masked_fill(~real.unsqueeze(-1), 0.0)  # padded rows may hold anything, even NaN
    cells, weights, point_cell = _bin(y, real)
    if cells.shape[1] == 0:  # no real point in the whole batch
        return Grouping(labels=torch.zeros(b, n, dtype=torch.long, device=pred.device),
                        k_hat=torch.zeros(b, dtype=torch.long, device=pred.device),
                        centres=torch.zeros_like(pred))
    # float32 for the O(u^2) work while its cancellation error in squared distances,
    # ~1e-7 |y|^2, stays below 1e-3 of the kernel's scale; beyond (SNR above ~50 dB) float64
    precise = pred.dtype == torch.float64 or float(y.square().sum(-1).max()) > FLOAT32_MAX_NORM2
    work = torch.float64 if precise else torch.float32

    modes = _mean_shift(cells.to(work), weights.to(work), max_iter, tol)
    root = _components(modes, weights > 0, merge_radius)
    root = _merge_small(cells, root, weights, smallest)
    root = root.gather(1, point_cell)  # [b, n]: each point's group, by its root cell

    # number the groups by decreasing size (stable: ties keep the order of their root cells)
    values = pred.to(torch.float64).masked_fill(~real.unsqueeze(-1), 0.0)
    u = cells.shape[1]
    size = torch.zeros(b, u, dtype=torch.float64, device=pred.device).scatter_add_(
        1, root, real.to(torch.float64))
    sums = torch.zeros(b, u, values.shape[-1], dtype=torch.float64,
                       device=pred.device).scatter_add_(
        1, root.unsqueeze(-1).expand_as(values), values)
    order = torch.argsort(size, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(u, device=pred.device).expand(b, u).contiguous())
    labels = rank.gather(1, root).masked_fill(~real, 0)
    group_mean = sums / size.clamp_min(1).unsqueeze(-1)
    centres = group_mean.gather(1, root.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    centres = centres.masked_fill(~real.unsqueeze(-1), 0.0).to(pred.dtype)
    return Grouping(labels=labels, k_hat=(size > 0).sum(1), centres=centres)
