"""Validation of a model on a fixed bank of sets: model metrics, baselines and breakdowns.

:func:`validation_sums` returns a matrix of per-metric *sums* over sets, one row per group of
sets and one column per (method, metric) after a first column of set counts (its layout is
:class:`Layout`), so a trainer can all-reduce it across processes and only then average it
into nested :class:`~gmmt.evaluation.results.Results` (:func:`summarise`).

Methods: the model (its raw predictions); with ``refinement`` (``model.refinement.enabled``)
the model refined by EM from its own clusters, with its own K (``refined``) and with the true K
(``refined_told_k``), see :mod:`gmmt.evaluation.refine`; then the configured baselines.

Groups: all sets; with ``breakdown.by_snr`` equal-width SNR bins over the data prior's support;
with ``breakdown.by_k`` every K the prior can draw; with ``breakdown.by_separation`` bins of the
distance between the set's two closest centres in noise stds (0-3, 3-6, 6-12, 12+).

``mse_over_noise`` is the per-set MSE / sigma^2 averaged over sets. ``ari`` / ``nmi`` score a
clustering: the model's own (its predictions grouped without K, :mod:`gmmt.evaluation.grouping`)
and each baseline's assignments. ``k_accuracy`` is the share of sets whose K was found, for the
methods that choose K: the model (its count head's most probable K, else the number of groups of
its predictions), ``refined`` (the model's K), ``em_bic`` and ``bayes_unknown_k``.
``induced_ari`` / ``induced_nmi`` (the model only) score the clusters the TRUE centres induce
on the predictions (each prediction's nearest true centre): they use the truth and are not a
clustering. ``unconverged`` (``bayes`` and ``bayes_unknown_k`` only) is the share of sets whose
Gibbs chains disagree.

Derived in :func:`summarise` from averaged MSEs, per group, wherever their inputs were scored:
``excess_over_bayes`` = MSE / MSE_bayes - 1 (every method), ``reachable_gap`` = (MSE_em_tied -
MSE_model) / (MSE_em_tied - MSE_bayes) and ``gap_closed`` = (MSE_em - MSE_model) / (MSE_em -
MSE_oracle) (the model).
"""

import torch
from attrs import define
from torch import nn

from gmmt.config.data import DataConfig
from gmmt.config.model import RefinementConfig
from gmmt.config.validation import DERIVED_METRICS, ValidationConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import derive_seed, make_generator
from gmmt.evaluation.baselines import BaselineResult, run_baseline
from gmmt.evaluation.grouping import group_predictions
from gmmt.evaluation.metrics import (
    adjusted_rand_index,
    centre_mse_per_set,
    closest_centre_separation,
    energy_distance,
    entropic_wasserstein,
    gap_closed,
    induced_clusters,
    k_index,
    k_values,
    normalized_mutual_info,
    separation_bin_index,
    separation_bin_labels,
    snr_bin_index,
    snr_bin_labels,
    snr_bins,
)
from gmmt.evaluation.refine import refine, refine_unknown_k, run_model
from gmmt.evaluation.results import MODEL, Results, Scores

# The model refined by EM from its clusters: with its own K, and told the true K.
REFINED = ("refined", "refined_told_k")
# Methods that choose K themselves; the others are told it.
CHOOSES_K = (MODEL, "refined", "em_bic", "bayes_unknown_k")
# Methods that check their own convergence (the Gibbs samplers).
SAMPLERS = ("bayes", "bayes_unknown_k")


def _applies(method: str, metric: str) -> bool:
    """Whether ``method`` has ``metric`` (a told-K method has no K accuracy, etc.)."""
    if metric == "k_accuracy":
        return method in CHOOSES_K
    if metric in ("induced_ari", "induced_nmi"):
        return method == MODEL
    if metric == "unconverged":
        return method in SAMPLERS
    return True


@define(frozen=True)
class Layout:
    """Rows and columns of the :func:`validation_sums` matrix.

    Row 0 is every set, then one row per breakdown bin, ``groups[i] = (kind, label)``
    (``("all", "")`` for row 0). Column 0 counts the sets; column ``1 + i`` sums
    ``columns[i] = (method, metric)``: each method (``"model"``, then the baselines) with each of
    ``metrics`` that applies to it.
    """

    groups: tuple[tuple[str, str], ...]
    methods: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        return tuple((method, metric) for method in self.methods for metric in self.metrics
                     if _applies(method, metric))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.groups), 1 + len(self.columns)

    def column(self, method: str, metric: str) -> int:
        """The column that sums ``metric`` of ``method``."""
        return 1 + self.columns.index((method, metric))

    def method_metrics(self, method: str) -> list[str]:
        """The summed metrics ``method`` has, in order."""
        return [m for m in self.metrics if _applies(method, m)]


def layout(config: ValidationConfig, data: DataConfig, refined: bool = False) -> Layout:
    """The sum matrix of ``config`` on sets drawn from ``data`` (which sets the bins); with
    ``refined``, the refined model's two methods (REFINED) follow the model."""
    groups = [("all", "")]
    if config.breakdown.by_snr:
        edges = snr_bins(data.snr_db_params, config.breakdown.snr_bins)
        groups += [("by_snr", label) for label in snr_bin_labels(edges)]
    if config.breakdown.by_k:
        groups += [("by_k", str(k)) for k in k_values(data.cluster_params)]
    if config.breakdown.by_separation:
        groups += [("by_sep", label) for label in separation_bin_labels()]
    # The per-set metrics that are summed, in config order (derived ones need the MSEs).
    metrics = [m for m in config.metrics if m not in DERIVED_METRICS]
    if len(metrics) < len(config.metrics) and "mse" not in metrics:
        metrics.insert(0, "mse")
    if set(SAMPLERS) & set(config.baselines):
        metrics.append("unconverged")
    methods = (MODEL, *(REFINED if refined else ()), *config.baselines)
    return Layout(tuple(groups), methods, tuple(metrics))


def _bin_index(kind: str, batch: GMMBatch, config: ValidationConfig,
               data: DataConfig) -> torch.Tensor:
    """Each set's bin of one breakdown, [b] long, in the order :func:`layout` lists them."""
    if kind == "by_snr":
        return snr_bin_index(batch.snr_db, snr_bins(data.snr_db_params,
                                                    config.breakdown.snr_bins))
    if kind == "by_k":
        return k_index(batch.k, k_values(data.cluster_params))
    separation = closest_centre_separation(batch.centres, batch.k, batch.sigma)
    return separation_bin_index(separation)


def _membership(batch: GMMBatch, shape: Layout, config: ValidationConfig,
                data: DataConfig) -> torch.Tensor:
    """Which sets belong to each group of ``shape``, [groups, b] float64."""
    rows = [torch.ones(1, batch.num_sets, dtype=torch.float64, device=batch.points.device)]
    kinds = [kind for kind, _ in shape.groups[1:]]
    for kind in dict.fromkeys(kinds):
        index = _bin_index(kind, batch, config, data)
        rows.append(nn.functional.one_hot(index, kinds.count(kind)).T.double())
    return torch.cat(rows)


def _model_result(pred: torch.Tensor, count_probabilities: torch.Tensor | None,
                  batch: GMMBatch, metrics: list[str]) -> BaselineResult:
    """The model's answer as a method's: its predictions, its own clustering (the grouping of
    its predictions, computed only when a metric needs it) and its K (the count head's most
    probable K, else the number of groups)."""
    assignments = k_hat = None
    if {"ari", "nmi"} & set(metrics) or ("k_accuracy" in metrics
                                         and count_probabilities is None):
        grouping = group_predictions(pred, batch.points, batch.mask)
        assignments, k_hat = grouping.labels, grouping.k_hat
    if count_probabilities is not None:
        k_hat = count_probabilities.argmax(-1) + 1
    return BaselineResult(pred, assignments, k_hat)


def _scores(result: BaselineResult, batch: GMMBatch, metrics: list[str]) -> list[torch.Tensor]:
    """Each metric of ``metrics`` for every set of ``batch``, [b] float64 each, from a
    method's answer (its centres, assignments, K and convergence)."""
    sigma2 = batch.sigma.double().square()
    out: dict[str, torch.Tensor] = {}
    pred, assignments, k_hat = result.centres, result.assignments, result.k_hat
    if "mse" in metrics or "mse_over_noise" in metrics:
        mse = centre_mse_per_set(pred, batch.target, batch.mask)
        out["mse"], out["mse_over_noise"] = mse, mse / sigma2
    if "ari" in metrics:
        out["ari"] = adjusted_rand_index(batch.labels, assignments, batch.mask)
    if "nmi" in metrics:
        out["nmi"] = normalized_mutual_info(batch.labels, assignments, batch.mask)
    if "k_accuracy" in metrics:
        out["k_accuracy"] = (k_hat == batch.k).double()
    if {"induced_ari", "induced_nmi"} & set(metrics):
        induced = induced_clusters(pred, batch.centres, batch.weights)
        out["induced_ari"] = adjusted_rand_index(batch.labels, induced, batch.mask)
        out["induced_nmi"] = normalized_mutual_info(batch.labels, induced, batch.mask)
    if "unconverged" in metrics:
        out["unconverged"] = result.unconverged.double()
    if "energy" in metrics:
        out["energy"] = energy_distance(pred, batch.centres, batch.weights, batch.mask)
    if "wasserstein" in metrics:
        out["wasserstein"] = entropic_wasserstein(pred, batch.centres, batch.weights,
                                                  batch.sigma, batch.mask)
    return [out[m].to(torch.float64) for m in metrics]


def baseline_generator(seed: int, name: str, batch_index: int,
                       device: torch.device | str = "cpu") -> torch.Generator:
    """The generator baseline ``name`` draws from on validation batch ``batch_index``: a fixed
    function of (seed, name, batch index), so results do not depend on which other baselines
    run or in what order."""
    return make_generator(derive_seed(seed, f"baseline.{name}", 0, batch_index), device)


@torch.no_grad()
def validation_sums(model: nn.Module, batches: list[GMMBatch], config: ValidationConfig,
                    data: DataConfig, generator_seed: int = 0,
                    baseline_cache: dict[tuple[int, str], list[torch.Tensor]] | None = None,
                    refinement: RefinementConfig | None = None) -> torch.Tensor:
    """Per-metric sums over every set of ``batches``, float64 [groups, columns] laid out as
    :func:`layout` says (groups without sets hold 0), on the batches' device.

    Args:
        model: called as ``model(points, mask, snr_db)`` -> predicted centres [b, n, d]; put in
            eval mode for the call and restored afterwards.
        batches: the validation bank.
        config: which metrics, baselines and breakdowns.
        data: the prior the bank was drawn from (SNR bins and K values of the breakdowns).
        generator_seed: seeds the baselines' k-means++ draws (see :func:`baseline_generator`).
        baseline_cache: a dict kept by the caller across calls on the SAME ``batches`` (a
            fixed validation bank): baseline scores are computed once and reused, since they do
            not depend on the model.
        refinement: when enabled, the refined model is scored too (REFINED).
    """
    refined = refinement is not None and refinement.enabled
    shape = layout(config, data, refined)
    device = batches[0].points.device if batches else torch.device("cpu")
    totals = torch.zeros(shape.shape, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(batches):
            pred, count_probabilities = run_model(model, batch.points, batch.mask,
                                                  batch.snr_db)
            columns = [torch.ones(batch.num_sets, dtype=torch.float64, device=device)]
            own = _model_result(pred, count_probabilities, batch,
                                shape.method_metrics(MODEL) + ["k_accuracy"] * refined)
            columns += _scores(own, batch, shape.method_metrics(MODEL))
            if refined:
                iterations = refinement.iterations
                seeds = [baseline_generator(generator_seed, name, index, device)
                         for name in REFINED]
                # without a count head, own.k_hat is the grouping's K: not grouped twice
                results = (refine_unknown_k(batch.points, pred, count_probabilities, batch.mask,
                                            iterations=iterations, generator=seeds[0],
                                            groups_k=own.k_hat.clamp_min(1)),
                           refine(batch.points, pred, batch.k, batch.mask,
                                  iterations=iterations, generator=seeds[1]))
                for name, result in zip(REFINED, results):
                    columns += _scores(result, batch, shape.method_metrics(name))
            for name in config.baselines:
                scores = None if baseline_cache is None else baseline_cache.get((index, name))
                if scores is None:
                    result = run_baseline(name, batch, config.em,
                                          baseline_generator(generator_seed, name, index, device),
                                          config.bayes)
                    scores = _scores(result, batch, shape.method_metrics(name))
                    if baseline_cache is not None:
                        baseline_cache[(index, name)] = scores
                columns += scores
            per_set = torch.stack(columns, dim=1)  # [b, columns]
            totals += _membership(batch, shape, config, data) @ per_set
    finally:
        model.train(was_training)
    return totals


def _ratio(top: float, bottom: float) -> float | None:
    return top / bottom if bottom != 0 else None


def _with_derived(scores: Scores) -> Scores:
    """Adds the derived metrics (module docstring) where their MSEs are known: each method's
    ``excess_over_bayes`` after its MSE, the model's ``reachable_gap`` and ``gap_closed``."""
    mse = {method: values["mse"] for method, values in scores.items() if "mse" in values}
    derived: dict[str, dict[str, float | None]] = {m: {} for m in scores}
    if "bayes" in mse:
        for method in mse:
            if method != "bayes":
                excess = _ratio(mse[method], mse["bayes"])
                derived[method]["excess_over_bayes"] = None if excess is None else excess - 1
    # Only where tied EM is above the floor: below it (Monte-Carlo noise of a short chain, or
    # a bin where both are the sample means) the ratio's sign and size mean nothing.
    if MODEL in mse and {"em_tied", "bayes"} <= set(mse) and mse["em_tied"] > mse["bayes"]:
        derived[MODEL]["reachable_gap"] = _ratio(mse["em_tied"] - mse[MODEL],
                                                 mse["em_tied"] - mse["bayes"])
    if MODEL in mse and {"em", "oracle"} <= set(mse) and mse["em"] != mse["oracle"]:
        derived[MODEL]["gap_closed"] = float(gap_closed(mse[MODEL], mse["em"], mse["oracle"]))
    out: Scores = {}
    for method, values in scores.items():
        out[method] = {}
        for metric, value in values.items():
            out[method][metric] = value
            if metric == "mse":  # the derived metrics go right after the MSE
                out[method].update({k: v for k, v in derived[method].items() if v is not None})
    return out


def summarise(sums: torch.Tensor, shape: Layout) -> Results:
    """Means per set of a :func:`validation_sums` matrix (after any cross-process sum).

    Every metric is divided by its own group's set count; groups without sets are left out.
    Adds the derived metrics (see :func:`_with_derived`) in every group.
    """
    rows = sums.detach().double().cpu().tolist()
    overall: Scores = {}
    breakdowns: dict[str, dict[str, Scores]] = {}
    counts: dict[str, dict[str, int]] = {}
    num_sets = 0
    for (kind, label), row in zip(shape.groups, rows, strict=True):
        count = row[0]
        if count <= 0:
            continue
        scores = _with_derived({
            method: {metric: row[shape.column(method, metric)] / count
                     for metric in shape.method_metrics(method)}
            for method in shape.methods})
        if kind == "all":
            overall, num_sets = scores, round(count)
        else:
            breakdowns.setdefault(kind, {})[label] = scores
            counts.setdefault(kind, {})[label] = round(count)
    return Results(overall, breakdowns, counts, num_sets)
