"""Applying a trained model to a user's points: predicted centres and the model's own groups.

:func:`predict` runs a saved (or loaded) GMM transformer on points the user supplies, one set
``[n, d]`` or a batch ``[b, n, d]`` with a mask, and groups the predicted centres without being
told K (:func:`gmmt.evaluation.grouping.group_predictions`), or, refined, runs a few EM
iterations from the model's clusters (:mod:`gmmt.evaluation.refine`). Bad inputs raise
``ValueError``
with a one-line message naming the problem; ``python -m gmmt.predict`` is the command line.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gmmt.evaluation.grouping import group_predictions
from gmmt.evaluation.held_out import EvaluationError, pick_device
from gmmt.evaluation.refine import refine_unknown_k, run_model, unwrap
from gmmt.saved_model import load_model

ArrayLike = np.ndarray | Tensor


@dataclass
class Prediction:
    """What the model says about a set (or a batch of sets), on the CPU.

    Attributes:
        centres: the centre of every point, [n, d] (batched: [b, n, d], 0 at padding): the
            model's prediction, or the refined one when refinement ran.
        labels: the group of every point, 0..k_hat-1 by decreasing group size, [n] long
            (batched: [b, n], 0 at padding): the groups of the predictions; refined, each
            point's most responsible component of the fitted mixture.
        k_hat: the number of groups, an int (batched: [b] long tensor); refined, the number
            of the fitted mixture's components that hold points, normally the K it weighed
            most (with a count head: its probability times the fit's BIC evidence; see
            :mod:`gmmt.evaluation.refine`).
        group_centres: the mean of ``centres`` over each point's group, shaped like
            ``centres``.
        raw_centres: the model's own prediction (equal to ``centres`` when not refined).
        count_probabilities: P(K | points) for K = 1..K_max, [K_max] (batched: [b, K_max]),
            from the model's count head; ``None`` without one.
        refine_iterations: EM iterations at most of the refinement (0: not refined).
    """

    centres: Tensor
    labels: Tensor
    k_hat: int | Tensor
    group_centres: Tensor | None = None
    raw_centres: Tensor | None = None
    count_probabilities: Tensor | None = None
    refine_iterations: int = 0


def _as_points(points: ArrayLike) -> Tensor:
    """float32 tensor of the points; ValueError if they are not numbers."""
    if isinstance(points, Tensor):
        if points.is_complex() or points.dtype == torch.bool:
            raise ValueError(f"points must be real numbers, got a {points.dtype} tensor")
        return points.detach().to("cpu", torch.float32)
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("points must be an array of numbers") from None
    return torch.from_numpy(array).to(torch.float32)


def _resolve_model(model_or_run_dir: nn.Module | str | os.PathLike, device: str | torch.device
                   ) -> nn.Module:
    if isinstance(model_or_run_dir, nn.Module):
        return model_or_run_dir
    try:
        torch_device = pick_device(str(device))
    except EvaluationError as err:
        raise ValueError(str(err)) from None
    path = os.fspath(model_or_run_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return load_model(path, torch_device)


def _check(points: Tensor, mask: Tensor | None, input_dim: int | None) -> None:
    """One-line ValueErrors for every problem :func:`predict` refuses."""
    if points.dim() == 3 and points.shape[0] == 0:
        raise ValueError("no sets: the batch is empty")
    if points.shape[-2] == 0:
        raise ValueError("no points: at least one point is needed")
    if input_dim is not None and points.shape[-1] != input_dim:
        raise ValueError(f"points have {points.shape[-1]} coordinates, but the model was "
                         f"trained on {input_dim}-dimensional data")
    real = torch.ones(points.shape[:-1], dtype=torch.bool) if mask is None else mask
    bad = (~torch.isfinite(points)).any(-1) & real
    if bad.any():
        where = bad.nonzero()[0].tolist()
        at = f"point {where[-1]}" + (f" of set {where[0]}" if len(where) == 2 else "")
        raise ValueError(f"points contain NaN or inf ({int(bad.sum())} point(s), the first "
                         f"at {at})")
    if mask is not None and not mask.any(-1).all():
        empty = (~mask.any(-1)).nonzero()[0].tolist()
        raise ValueError(f"set {empty[0]} has no real point (its mask is all False)")


@torch.no_grad()
def predict(model_or_run_dir: nn.Module | str | os.PathLike, points: ArrayLike,
            mask: ArrayLike | None = None, *, device: str | torch.device = "cpu",
            bandwidth: float = 0.5, refine: int | None = None) -> Prediction:
    """Predict every point's centre and group the points by their predictions.

    Args:
        model_or_run_dir: a loaded GMM transformer (run on the device its weights are on, in
            eval mode; its training mode is restored afterwards), or a run folder (its
            ``final/``) or a ``final/`` or ``best/`` folder, loaded with
            :func:`gmmt.load_model` onto ``device``.
        points: one set [n, d] or a batch [b, n, d] (numpy array or tensor); d must be the
            model's input dimension.
        mask: batched form only: [b, n] bool, True = real point (default: all real); padded
            points may hold anything.
        device: where a model loaded from a folder runs: ``cpu``, ``cuda``, ``cuda:N`` or
            ``auto``.
        bandwidth: kernel width of the grouping, in units of the noise scale estimated from
            the set (see :func:`gmmt.evaluation.grouping.group_predictions`).
        refine: refine the answer by at most this many tied-variance EM iterations started
            from the model's clusters and K (0: the raw model); ``None``: as the model's
            ``model.refinement`` config says.

    Returns:
        :class:`Prediction`: centres [n, d], labels [n], k_hat int for one set; centres
        [b, n, d], labels [b, n], k_hat [b] for a batch.

    Raises:
        ValueError: bad points or mask (wrong shape or dimension, NaN/inf, no points), a bad
            device name or bandwidth.
        FileNotFoundError: no saved model at the path.
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    if refine is not None and refine < 0:
        raise ValueError(f"refine must be >= 0 (0: no refinement), got {refine}")
    x = _as_points(points)
    if x.dim() not in (2, 3):
        raise ValueError(f"points must be [n, d] or [b, n, d], got shape {list(x.shape)}")
    single = x.dim() == 2
    m = None
    if mask is not None:
        if single:
            raise ValueError("a mask is only for a batch of sets [b, n, d]")
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).cpu()
        if m.dtype != torch.bool or m.shape != x.shape[:2]:
            raise ValueError(f"mask must be bool {list(x.shape[:2])}, got {m.dtype} "
                             f"{list(m.shape)}")
    model = _resolve_model(model_or_run_dir, device)
    input_dim = getattr(model, "input_dim", None)
    _check(x, m, input_dim if isinstance(input_dim, int) else None)

    batch = x.unsqueeze(0) if single else x
    if m is not None:  # padded rows may hold NaN: nothing of theirs reaches the model
        batch = batch.masked_fill(~m.unsqueeze(-1), 0.0)
    weights = next(iter(model.parameters()), None)
    on = weights.device if weights is not None else torch.device("cpu")
    training = model.training
    model.eval()
    batch, m_on = batch.to(on), None if m is None else m.to(on)
    try:
        pred, probs = run_model(model, batch, m_on)
    finally:
        model.train(training)
    pred = pred.float()
    if refine is None:
        config = getattr(unwrap(model), "config", None)
        settings = getattr(config, "refinement", None)
        refine = settings.iterations if settings is not None and settings.enabled else 0
    if refine:
        # A fixed seed for the k-means++ start: the same points, the same answer, and the
        # caller's global RNG is left alone.
        generator = torch.Generator(device=on).manual_seed(0)
        groups_k = None if probs is not None else group_predictions(  # the caller's bandwidth
            pred, batch, m_on, bandwidth=bandwidth).k_hat.clamp_min(1)
        fit = refine_unknown_k(batch, pred, probs, m_on, iterations=refine,
                               generator=generator, groups_k=groups_k)
        centres = fit.centres
        labels, k_hat = _by_size(fit.assignments, m_on)
        means = _group_means(centres, labels, m_on)
    else:
        groups = group_predictions(pred, batch, m_on, bandwidth=bandwidth)
        centres, labels, k_hat, means = pred, groups.labels, groups.k_hat, groups.centres
    out = Prediction(centres=centres.float().cpu(), labels=labels.cpu(), k_hat=k_hat.cpu(),
                     group_centres=means.float().cpu(), raw_centres=pred.cpu(),
                     count_probabilities=None if probs is None else probs.cpu(),
                     refine_iterations=refine)
    if single:
        return Prediction(centres=out.centres[0], labels=out.labels[0], k_hat=int(out.k_hat[0]),
                          group_centres=out.group_centres[0], raw_centres=out.raw_centres[0],
                          count_probabilities=None if probs is None
                          else out.count_probabilities[0],
                          refine_iterations=refine)
    return out


def _by_size(labels: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Labels [b, n] renumbered 0..m-1 by decreasing group size (ties by the old number), and
    the number m [b] of groups that hold points: a fitted component may end up empty."""
    k = int(labels.max()) + 1 if labels.numel() else 1
    member = torch.nn.functional.one_hot(labels, k)  # [b, n, k]
    if mask is not None:
        member = member * mask.unsqueeze(-1)
    sizes = member.sum(1)  # [b, k]
    order = torch.argsort(-sizes * (k + 1) + torch.arange(k, device=labels.device), dim=1)
    rank = torch.argsort(order, dim=1)  # old label -> new label
    relabelled = rank.gather(1, labels)
    if mask is not None:
        relabelled = relabelled.masked_fill(~mask, 0)
    return relabelled, (sizes > 0).sum(1)


def _group_means(centres: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``centres`` [b, n, d] over each point's group ``labels`` [b, n], [b, n, d]
    (0 at padded points)."""
    k = int(labels.max()) + 1 if labels.numel() else 1
    member = torch.nn.functional.one_hot(labels, k).to(centres.dtype)  # [b, n, k]
    if mask is not None:
        member = member * mask.unsqueeze(-1).to(centres.dtype)
    sums = member.transpose(1, 2) @ centres  # [b, k, d]
    means = sums / member.sum(1).clamp_min(1).unsqueeze(-1)
    return member @ means
