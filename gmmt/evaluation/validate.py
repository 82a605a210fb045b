"""Validation of a model on a fixed bank of sets: model metrics, baselines and breakdowns.

:func:`validation_sums` returns per-metric *sums* over sets, with set counts, under the fixed
key list of :func:`metric_keys`, so a trainer can stack them into one vector, all-reduce it
across processes and only then average (:func:`averages`).

Keys (``<m>`` is each metric of ``config.metrics`` except the derived ``gap_closed``):

* ``count`` (sets), ``<m>`` for the model, ``baselines.<name>.<m>`` for each baseline;
* with ``breakdown.by_snr``: the same under ``by_snr.<lo>_<hi>.`` for equal-width SNR bins over
  the data prior's support (``by_snr.<lo>_<hi>.count`` counts its sets);
* with ``breakdown.by_k``: the same under ``by_k.<K>.`` for every K the prior can draw;
* with ``breakdown.by_separation``: the same under ``by_sep.<lo>_<hi>.`` for bins of the
  distance between the set's two closest centres in noise stds (0-3, 3-6, 6-12, 12+).

``mse_over_noise`` is the per-set MSE / sigma^2 averaged over sets. ``ari`` / ``nmi`` of the
model score the clustering its predictions induce (each prediction's nearest true centre, see
:func:`gmmt.evaluation.metrics.induced_clusters`); baselines are scored on their own assignments.
``gap_closed`` is derived in :func:`averages` from the averaged MSEs of the model, EM and the
oracle (overall and per bin), so it needs no sum of its own.
"""

import torch
from torch import nn

from gmmt.config.data import DataConfig
from gmmt.config.validation import ValidationConfig
from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import derive_seed, make_generator
from gmmt.evaluation.baselines import run_baseline
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

COUNT = "count"
DERIVED = "gap_closed"


def _summed_metrics(config: ValidationConfig) -> list[str]:
    """The per-set metrics that are summed, in config order (gap_closed needs the MSEs)."""
    names = [m for m in config.metrics if m != DERIVED]
    if DERIVED in config.metrics and "mse" not in names:
        names.insert(0, "mse")
    return names


def _local_names(config: ValidationConfig) -> list[str]:
    """Key suffixes inside one group: count, model metrics, then each baseline's."""
    metrics = _summed_metrics(config)
    return ([COUNT, *metrics]
            + [f"baselines.{b}.{m}" for b in config.baselines for m in metrics])


def _group_prefixes(config: ValidationConfig, data: DataConfig) -> list[str]:
    """'' (all sets), then one prefix per SNR bin, per K and per separation bin when the
    breakdown asks."""
    prefixes = [""]
    if config.breakdown.by_snr:
        edges = snr_bins(data.snr_db_params, config.breakdown.snr_bins)
        prefixes += [f"by_snr.{label}." for label in snr_bin_labels(edges)]
    if config.breakdown.by_k:
        prefixes += [f"by_k.{k}." for k in k_values(data.cluster_params)]
    if config.breakdown.by_separation:
        prefixes += [f"by_sep.{label}." for label in separation_bin_labels()]
    return prefixes


def metric_keys(config: ValidationConfig, data: DataConfig) -> list[str]:
    """The keys :func:`validation_sums` fills, in a fixed order (for cross-process reduction)."""
    names = _local_names(config)
    return [prefix + name for prefix in _group_prefixes(config, data) for name in names]


def _membership(batch: GMMBatch, config: ValidationConfig, data: DataConfig) -> torch.Tensor:
    """Which sets belong to each group of :func:`_group_prefixes`, [groups, b] float64."""
    b, device = batch.num_sets, batch.points.device
    rows = [torch.ones(1, b, dtype=torch.float64, device=device)]
    if config.breakdown.by_snr:
        edges = snr_bins(data.snr_db_params, config.breakdown.snr_bins)
        index = snr_bin_index(batch.snr_db, edges)
        rows.append(nn.functional.one_hot(index, len(edges)).T.double())
    if config.breakdown.by_k:
        values = k_values(data.cluster_params)
        rows.append(nn.functional.one_hot(k_index(batch.k, values), len(values)).T.double())
    if config.breakdown.by_separation:
        separation = closest_centre_separation(batch.centres, batch.k, batch.sigma)
        labels = separation_bin_labels()
        rows.append(nn.functional.one_hot(separation_bin_index(separation), len(labels)).T
                    .double())
    return torch.cat(rows)


def _scores(pred: torch.Tensor, assignments: torch.Tensor | None, batch: GMMBatch,
            metrics: list[str]) -> list[torch.Tensor]:
    """Each metric of ``metrics`` for every set of ``batch``, [b] float64 each.

    ``assignments`` [b, n] (None: the clusters that ``pred`` induces) feed ARI / NMI.
    """
    sigma2 = batch.sigma.double().square()
    if assignments is None and ("ari" in metrics or "nmi" in metrics):
        assignments = induced_clusters(pred, batch.centres, batch.weights)
    out = {}
    if "mse" in metrics or "mse_over_noise" in metrics:
        mse = centre_mse_per_set(pred, batch.target, batch.mask)
        out["mse"], out["mse_over_noise"] = mse, mse / sigma2
    if "ari" in metrics:
        out["ari"] = adjusted_rand_index(batch.labels, assignments, batch.mask)
    if "nmi" in metrics:
        out["nmi"] = normalized_mutual_info(batch.labels, assignments, batch.mask)
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
                    baseline_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-metric sums over every set of ``batches``, float64 scalars keyed and ordered as
    :func:`metric_keys` (groups without sets hold 0).

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
    """
    metrics = _summed_metrics(config)
    names = _local_names(config)
    prefixes = _group_prefixes(config, data)
    device = batches[0].points.device if batches else torch.device("cpu")
    totals = torch.zeros(len(prefixes), len(names), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(batches):
            pred = model(batch.points, batch.mask, batch.snr_db)
            columns = [torch.ones(batch.num_sets, dtype=torch.float64, device=device)]
            columns += _scores(pred, None, batch, metrics)
            for name in config.baselines:
                scores = None if baseline_cache is None else baseline_cache.get((index, name))
                if scores is None:
                    result = run_baseline(name, batch, config.em,
                                          baseline_generator(generator_seed, name, index, device))
                    scores = _scores(result.centres, result.assignments, batch, metrics)
                    if baseline_cache is not None:
                        baseline_cache[(index, name)] = scores
                columns += scores
            per_set = torch.stack(columns, dim=1)  # [b, names]
            totals += _membership(batch, config, data) @ per_set
    finally:
        model.train(was_training)
    flat = totals.reshape(-1)
    return {key: flat[i] for i, key in enumerate(metric_keys(config, data))}


def _count_prefix(key: str, prefixes: list[str]) -> str:
    """The group of ``key``: the longest prefix (of those with a count) it starts with."""
    return max((p for p in prefixes if key.startswith(p)), key=len)


def averages(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Means per set from :func:`validation_sums` output (after any cross-process sum).

    Every metric is divided by its own group's ``count``; groups without sets are left out.
    Adds ``gap_closed`` (and ``<group>.gap_closed``) wherever the model's, EM's and the
    oracle's MSE are all present and EM differs from the oracle. Count keys are not returned.
    """
    prefixes = [k[: -len(COUNT)] for k in sums if k == COUNT or k.endswith("." + COUNT)]
    means: dict[str, float] = {}
    for key, value in sums.items():
        prefix = _count_prefix(key, prefixes)
        count = float(sums[prefix + COUNT])
        if key != prefix + COUNT and count > 0:
            means[key] = float(value) / count
    out: dict[str, float] = {}
    for key, value in means.items():
        out[key] = value
        prefix = _count_prefix(key, prefixes)
        if key == prefix + "mse":  # the derived metric goes right after the model's MSE
            em, oracle = (means.get(prefix + f"baselines.{b}.mse") for b in ("em", "oracle"))
            if em is not None and oracle is not None and em != oracle:
                out[prefix + DERIVED] = float(gap_closed(value, em, oracle))
    return out
