"""Amortized + refined inference: classical EM started where the model's answer points.

The model's predictions give a set's clusters in one forward pass; a few iterations of
tied-variance EM on the points, started there, turn them into a fitted mixture whose
posterior-mean centres sum_k r_ik mu_k are the refined answer. EM from a good start needs no
restarts, and its iterations are cheap next to the restarts a cold start needs.

The start: the predictions clustered into K groups by k-means (they collapse onto their
clusters' centres, so this is easy), then EM's usual first M-step on the points' nearest group.

Which K:

* told K (``refined_told_k``): the true K, as the classical yardsticks are told it;
* not told K (``refined``, :func:`refine_unknown_k`): with a count head, every K the head
  gives at least MIN_PROBABILITY (and its most probable K) is refined, and the refined centres
  are averaged, E[mu | x] ~ sum_K w_K E[mu | x, K], with weights w_K proportional to
  P_head(K | x) exp(-BIC_K / 2): the head's answer times the refined fit's BIC approximation
  of the evidence p(x | K) (BIC = -2 log L + p log n, p = Kd + K free parameters of a tied
  spherical mixture). The head alone weighs the likely K less well, and BIC alone needs a fit
  for every K; both were measured (docs/experiments.md). That average is then blended with
  the model's own prediction, c * refined + (1 - c) * raw, where c is the head's probability of
  its most probable K: a mixture fitted at a K the head is unsure of is often wrong, the network
  answers without choosing K, and the two err differently, so where the count is uncertain
  their average beats either alone (where the head is sure, c ~ 1 and the fit stands). Without
  a count head, K is the number of groups in the model's predictions
  (:func:`gmmt.evaluation.grouping.group_predictions`) and the fit is returned unblended.

Shape legend: b sets, n points, d dims, k components (K_max of the batch).
"""

import math

import torch
from torch import Tensor, nn

from gmmt.evaluation.baselines import BaselineResult, EMFit, bic_parameters, fit_em, fit_kmeans
from gmmt.evaluation.grouping import group_predictions

# EM stops on a set once its mean log-likelihood per point gains less than this.
TOLERANCE = 1e-6
# Not told K, the K values refined for a set are its most probable one and any other the count
# head gives at least this probability (the rest of the mass is spread over the kept ones).
MIN_PROBABILITY = 0.01


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / Accelerate wrapper (``module``), or the model itself."""
    return getattr(model, "module", model)


def has_count_head(model: nn.Module) -> bool:
    """Whether the model answers P(K | points) (see ``gmmt.model.transformer.CountHead``)."""
    return getattr(unwrap(model), "count_head", None) is not None


def run_model(model: nn.Module, points: Tensor, mask: Tensor | None,
              snr_db: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The predicted centres [b, n, d] and, with a count head, P(K | points) [b, K_max]
    (K = 1..K_max; else ``None``)."""
    if not has_count_head(model):
        return model(points, mask, snr_db), None
    pred, aux = model(points, mask, snr_db, return_aux=True)
    return pred, torch.softmax(aux.count_logits.float(), -1)


def model_k(pred: Tensor, points: Tensor, mask: Tensor | None,
            count_probabilities: Tensor | None) -> Tensor:
    """The model's K for every set, [b] long: the count head's most probable K when given,
    else the number of groups of its predictions."""
    if count_probabilities is not None:
        return count_probabilities.argmax(-1) + 1
    return group_predictions(pred.float(), points, mask).k_hat.clamp_min(1)


@torch.no_grad()
def refine(points: Tensor, pred: Tensor, k: Tensor, mask: Tensor | None = None, *,
           iterations: int = 20, generator: torch.Generator | None = None) -> BaselineResult:
    """Refined centres: tied-variance EM with ``k`` [b] components, started from the model's
    predictions ``pred`` [b, n, d] clustered into ``k`` groups.

    Args:
        points [b, n, d]; pred [b, n, d]; k [b] long (>= 1); mask [b, n] bool or None.
        iterations: EM iterations at most (a set stops once it gains less than TOLERANCE).
        generator: seeds the k-means++ start of the clustering of the predictions.

    Returns:
        The posterior-mean centre of every point, argmax-responsibility assignments and
        ``k_hat`` = ``k``.
    """
    k = k.to(torch.long).clamp_min(1)
    result = _fit(points, pred, k, mask, iterations, generator).result(mask)
    result.centres = result.centres.to(points.dtype)
    result.k_hat = k
    return result


def _fit(points: Tensor, pred: Tensor, k: Tensor, mask: Tensor | None, iterations: int,
         generator: torch.Generator | None) -> EMFit:
    """Tied EM with ``k`` [b] components from the predictions clustered into ``k`` groups."""
    groups = fit_kmeans(pred.to(points.dtype), k, mask, generator=generator)
    return fit_em(points, k, mask, seeds=groups.centroids, max_iter=iterations, tol=TOLERANCE,
                  tied=True)


@torch.no_grad()
def refine_unknown_k(points: Tensor, pred: Tensor, count_probabilities: Tensor | None,
                     mask: Tensor | None = None, *, iterations: int = 20,
                     generator: torch.Generator | None = None,
                     groups_k: Tensor | None = None) -> BaselineResult:
    """Refined centres when K is not told (module docstring): averaged over the count head's
    likely K values (``count_probabilities`` [b, K_max]) with weights from the head and each
    fit's BIC, then blended with ``pred`` by the head's confidence (:func:`blend`); or, when
    ``count_probabilities`` is None, fitted with the number of groups of the predictions
    (``groups_k`` [b] if the caller has grouped them already).

    The assignments are those of the K with the largest weight, which is ``k_hat``.
    """
    if count_probabilities is None:
        k_hat = model_k(pred, points, mask, None) if groups_k is None else groups_k
        return refine(points, pred, k_hat, mask, iterations=iterations, generator=generator)
    averaged = _average_over_k(points, pred, count_probabilities, mask, iterations=iterations,
                               generator=generator)
    averaged.centres = blend(averaged.centres, pred, count_probabilities.amax(1), mask)
    return averaged


def _average_over_k(points: Tensor, pred: Tensor, count_probabilities: Tensor,
                   mask: Tensor | None = None, *, iterations: int = 20,
                   generator: torch.Generator | None = None) -> BaselineResult:
    """The refined centres averaged over the head's likely K with weights w_K (module
    docstring), before the blend; the assignments are those of the K with the largest weight,
    which is ``k_hat``."""
    probs = count_probabilities.to(points.device, torch.float64)
    b, k_max = probs.shape
    kept = (probs >= MIN_PROBABILITY) | torch.nn.functional.one_hot(
        probs.argmax(1), k_max).bool()
    counts = (torch.full((b,), points.shape[1], device=points.device) if mask is None
              else mask.sum(1)).double().clamp_min(1)  # a set without points: log n = 0
    log_weights = torch.full_like(probs, -math.inf)
    fits: dict[int, tuple[Tensor, BaselineResult]] = {}
    for k in range(1, k_max + 1):
        sets = kept[:, k - 1].nonzero().squeeze(1)
        if sets.numel() == 0:
            continue
        sub_mask = None if mask is None else mask[sets]
        fit = _fit(points[sets], pred[sets], torch.full_like(sets, k), sub_mask, iterations,
                   generator)
        n = counts[sets]
        bic = -2 * fit.log_likelihood.double() * n + bic_parameters(k, points.shape[-1]) * n.log()
        log_weights[sets, k - 1] = probs[sets, k - 1].log() - 0.5 * bic
        fits[k] = (sets, fit.result(sub_mask))
    weights = torch.softmax(log_weights, 1).to(points.dtype)  # [b, K_max], 0 where not kept
    k_hat = weights.argmax(1) + 1
    centres = torch.zeros_like(points)
    assignments = torch.zeros(points.shape[:2], dtype=torch.long, device=points.device)
    for k, (sets, result) in fits.items():
        centres[sets] += weights[sets, k - 1].view(-1, 1, 1) * result.centres.to(points.dtype)
        chosen = k_hat[sets] == k
        assignments[sets[chosen]] = result.assignments[chosen]
    return BaselineResult(centres, assignments, k_hat)


def blend(refined: Tensor, pred: Tensor, confidence: Tensor,
          mask: Tensor | None = None) -> Tensor:
    """c * refined + (1 - c) * pred [b, n, d] (0 at padding), c = ``confidence`` [b]: the count
    head's probability of its most probable K (module docstring).

    Not the fits' weights w_K: their BIC is sure of one K on almost every set, overlapping
    ones included, so blending by them changes little (docs/experiments.md)."""
    c = confidence.to(refined.device, refined.dtype).view(-1, 1, 1)
    blended = c * refined + (1 - c) * pred.to(refined.dtype)
    return blended if mask is None else blended.masked_fill(~mask.unsqueeze(-1), 0.0)
